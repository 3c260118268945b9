"""`recalq up` and `recalq demo`: run every process in the foreground. (Filled in next.)"""

from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    return None
