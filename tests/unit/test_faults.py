"""Fault points (RECALQ_FAULT): the hooks fault tests use to kill or pause a real process at an
exact step. A spec that parses into something other than what the test meant would make a
fault test pass without injecting its fault, so bad specs must fail loudly."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from recalq import faults
from recalq.faults import probe_from_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spec", [None, ""])
def test_without_a_spec_every_point_is_a_no_op(spec):
    probe = probe_from_spec(spec)
    for point in ("relay.after_claim", "relay.after_publish", "recalculation.before_commit"):
        assert probe(point) is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param("relay.after_publish", "must look like", id="no-action"),
        pytest.param("relay.after_publish=", "must look like", id="empty-action"),
        pytest.param("=kill", "must look like", id="no-point"),
        pytest.param("relay.after_publish=explode", "unknown fault action 'explode'", id="unknown-action"),
        pytest.param("relay.after_publish=KILL", "unknown fault action", id="case-matters"),
        pytest.param("relay.after_publish=wait", "unknown fault action", id="wait-without-path"),
        pytest.param("relay.after_publish=wait:", "needs a path", id="wait-with-empty-path"),
    ],
)
def test_a_malformed_spec_is_refused_with_the_expected_form(spec, message):
    with pytest.raises(ValueError, match=message):
        probe_from_spec(spec)


def test_the_wait_action_blocks_at_its_point_until_the_gate_file_exists(tmp_path):
    gate = tmp_path / "gate"
    probe = probe_from_spec(f"relay.after_publish=wait:{gate}")
    returned = threading.Event()

    def reach_point() -> None:
        probe("relay.after_publish")
        returned.set()

    paused = threading.Thread(target=reach_point, daemon=True)
    paused.start()
    assert not returned.wait(timeout=0.3), "the probe went on before the gate existed"

    opener = threading.Thread(target=gate.touch)
    opener.start()
    opener.join()
    assert returned.wait(timeout=10), "the probe did not go on once the gate existed"
    paused.join(timeout=10)


def test_the_wait_action_does_not_pause_at_other_points(tmp_path):
    probe = probe_from_spec(f"relay.after_publish=wait:{tmp_path / 'never'}")
    finished = threading.Event()
    worker = threading.Thread(target=lambda: (probe("relay.after_claim"), finished.set()), daemon=True)
    worker.start()
    assert finished.wait(timeout=5)


def test_the_wait_action_gives_up_after_its_bound_so_a_forgotten_gate_cannot_hang_a_run(tmp_path, monkeypatch):
    class Clock:
        """Every look at the clock is a minute later; sleeping costs nothing."""

        now = 0.0
        sleeps = 0

        def monotonic(self) -> float:
            self.now += 60
            return self.now

        def sleep(self, seconds: float) -> None:
            self.sleeps += 1

    clock = Clock()
    monkeypatch.setattr(faults, "time", clock)
    probe_from_spec(f"p=wait:{tmp_path / 'never'}")("p")
    assert 0 < clock.sleeps <= 3  # about 120 s of fake minutes, then it goes on


def _run_probe(spec: str, *points: str) -> subprocess.CompletedProcess:
    script = (
        "import sys; from recalq.faults import probe_from_spec\n"
        "probe = probe_from_spec(sys.argv[1])\n"
        "for point in sys.argv[2:]:\n"
        "    print('reached', point, flush=True)\n"
        "    probe(point)\n"
        "print('survived', flush=True)\n"
    )
    return subprocess.run([sys.executable, "-c", script, spec, *points], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)


def test_the_kill_action_kills_the_process_with_sigkill_at_its_point_and_not_before():
    done = _run_probe("relay.after_publish=kill", "relay.after_claim", "relay.after_publish", "relay.after_mark")
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.splitlines() == ["reached relay.after_claim", "reached relay.after_publish"]


def test_the_kill_action_leaves_a_process_that_never_reaches_its_point_alone():
    done = _run_probe("relay.after_publish=kill", "relay.after_claim", "relay.after_mark")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "survived"
