"""The provider simulator for evaluation tests: served by uvicorn on a loopback port (in a thread
of the test process, or as a real `recalq simulator` process), with the calls a test makes to
script its faults and count what reached it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx

from recalq.provider_simulator import create_simulator
from tests.harness.api_server import serving


@dataclass
class Simulator:
    url: str

    def script(self, stage: str, **rule: Any) -> None:
        answer = httpx.post(f"{self.url}/_control/script", json={"stage": stage, **rule}, timeout=5)
        assert answer.status_code == 200, answer.text

    def release(self, stage: str) -> None:
        assert httpx.post(f"{self.url}/_control/release", json={"stage": stage}, timeout=5).status_code == 200

    def calls(self, address: str | None = None) -> dict[str, int]:
        params = {"address": address} if address is not None else {}
        return httpx.get(f"{self.url}/_control/calls", params=params, timeout=5).json()["by_stage"]


@contextmanager
def simulator_in_thread(latency_seconds: float = 0.0) -> Iterator[Simulator]:
    with serving(create_simulator(latency_seconds=latency_seconds)) as url:
        yield Simulator(url)
