"""The layout's import rules, read from the source: what is generic about jobs (outbox/) knows
no domain, no Celery and no composition root; the domain (services/) and the Celery adapters
(tasks/) know no composition root. Only recalq/ knows every concrete class.

Imports are read with `ast`, inside functions too, so a lazy import breaks the rule as surely as
one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: package -> top-level modules it must never import
FORBIDDEN = {
    "outbox": {"services", "tasks", "api", "recalq", "celery", "kombu", "amqp"},
    "services": {"recalq", "tasks", "api", "celery", "kombu"},
    "tasks": {"recalq", "api"},
}
#: `python -m outbox` is an entry point: it hands over to the composition root's CLI.
ENTRY_POINTS = {Path("outbox/__main__.py")}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def violations(package: str) -> list[str]:
    broken = []
    for path in sorted((ROOT / package).rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative in ENTRY_POINTS:
            continue
        for module in sorted(imported_modules(path)):
            if module.split(".")[0] in FORBIDDEN[package]:
                broken.append(f"{relative} imports {module}")
    return broken


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_its_layer_forbids(package: str) -> None:
    assert violations(package) == []


def test_the_rule_reader_sees_top_level_and_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "sample.py"
    module.write_text("import celery.app\nfrom services import x\ndef f():\n    from recalq.bootstrap import runtime\n")
    assert imported_modules(module) == {"celery.app", "services", "recalq.bootstrap"}


def test_only_the_composition_root_and_its_entry_module_build_the_celery_app() -> None:
    builders = [str(path.relative_to(ROOT)) for package in ("outbox", "services", "tasks", "api")
                for path in sorted((ROOT / package).rglob("*.py"))
                if "Celery(" in path.read_text(encoding="utf-8")]
    assert builders == []
