"""Admission's queue, driven with a fake app whose requests finish when the test says: who runs
next when a slot frees, and who is refused."""

from __future__ import annotations

import asyncio
from typing import Any

from api.admission import Admission, AdmissionLimits


class Paced:
    """An app whose every request runs until the test releases it."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release: dict[str, asyncio.Event] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        name = scope["path"]
        self.release[name] = asyncio.Event()
        self.started.append(name)
        await self.release[name].wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def _request(admission: Admission, caller: str, name: str, answers: dict[str, int]) -> asyncio.Task[None]:
    scope = {"type": "http", "path": name, "headers": [(b"authorization", caller.encode())], "client": ("x", 1)}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answers[name] = message["status"]

    return asyncio.ensure_future(admission(scope, receive, send))


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def _limits(**overrides: Any) -> AdmissionLimits:
    return AdmissionLimits(**{"slots": 1, "max_waiting": 10, "max_wait_seconds": 30, "tenant_slots": 1,
                              "rate": 1000, "burst": 1000, "tenant_queue": 5, **overrides})


def test_a_freed_slot_goes_to_the_caller_running_the_fewest_not_to_the_oldest_waiter() -> None:
    async def scenario() -> list[str]:
        app, answers = Paced(), {}
        admission = Admission(app, _limits(slots=2, tenant_slots=2))
        tasks = [_request(admission, "greedy", f"/g{i}", answers) for i in range(4)]
        await _settle()
        tasks.append(_request(admission, "other", "/o", answers))
        await _settle()
        assert app.started == ["/g0", "/g1"]  # two slots, both the greedy caller's; g2, g3, o wait
        app.release["/g0"].set()
        await _settle()
        app.release["/g1"].set()
        await _settle()
        for name in ("/o", "/g2", "/g3"):
            app.release[name].set()
            await _settle()
        await asyncio.gather(*tasks)
        return app.started

    # g0 frees a slot: greedy runs 1, other 0, so other goes before the older g2.
    assert asyncio.run(scenario()) == ["/g0", "/g1", "/o", "/g2", "/g3"]


def test_a_caller_past_its_waiting_places_is_refused_at_once_while_others_still_queue() -> None:
    async def scenario() -> dict[str, int]:
        app, answers = Paced(), {}
        admission = Admission(app, _limits(tenant_queue=1))
        tasks = [_request(admission, "greedy", f"/g{i}", answers) for i in range(3)]
        await _settle()
        tasks.append(_request(admission, "other", "/o", answers))
        await _settle()
        refused = dict(answers)
        for name in ("/g0", "/g1", "/o"):
            await _settle()
            app.release[name].set()
        await asyncio.gather(*tasks)
        return refused

    # g0 runs, g1 takes greedy's one waiting place, g2 is refused; other still waits its turn.
    assert asyncio.run(scenario()) == {"/g2": 429}


def test_a_request_that_waited_only_for_its_own_callers_share_is_told_429_not_overloaded() -> None:
    async def scenario() -> dict[str, int]:
        app, answers = Paced(), {}
        admission = Admission(app, _limits(slots=2, tenant_slots=1, max_wait_seconds=0.05))
        first = _request(admission, "greedy", "/g0", answers)
        await _settle()
        second = _request(admission, "greedy", "/g1", answers)
        await second
        app.release["/g0"].set()
        await first
        return answers

    assert asyncio.run(scenario()) == {"/g1": 429, "/g0": 200}
