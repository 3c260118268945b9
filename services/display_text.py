"""What a name shown to people may contain: any printable text, nothing that hides or reorders it.

Control characters (a NUL cannot even be stored), line and paragraph separators, and the bidi
controls that make a name read differently from what it is ("invoice\u202efdp.exe") are refused
in every name a person reads: file names, property and client names, labels, reasons.
"""

from __future__ import annotations

import unicodedata

from services.errors import InvalidInput

BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def unsafe_characters(text: str, *, multiline: bool = False) -> list[str]:
    """The refused characters in `text`, as U+XXXX, in order of appearance (each once).
    `multiline` text (a reason) may also hold line feeds and tabs."""
    found: dict[str, None] = {}
    for ch in text:
        if multiline and ch in "\n\t":
            continue
        if unicodedata.category(ch) in _REFUSED_CATEGORIES or ch in BIDI_CONTROLS:
            found[f"U+{ord(ch):04X}"] = None
    return list(found)


def require_display_text(text: str, *, field: str) -> None:
    bad = unsafe_characters(text)
    if bad:
        raise InvalidInput(f"{field} contains characters that hide or reorder text: {', '.join(bad)}",
                           field=field, rule="printable_text")
