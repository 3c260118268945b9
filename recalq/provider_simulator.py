"""A stand-in for the external providers a property evaluation calls, one per stage.

The embedded default, the demo and the tests point every provider URL at this one small HTTP
service (`recalq simulator`): deterministic answers after a configurable latency, and failures
a test scripts per stage (never a random rate).

Lookups
    GET /lookup/{stage}?address=TEXT
        stage: ^[a-z][a-z0-9_]{0,39}$; address: 1 to 300 characters (else 422).
        200 {"stage": stage, "address": address, "answer": {...}}, the answer a pure function of
        sha256("{stage}|{address}") (the address exactly as sent), the same in every process:
          locate_address   {"uprn": 12-digit int, "latitude": 49.9..58.7, "longitude": -8.0..1.8,
                            "postcode": "AB12 3CD"}
          energy_register  {"rating": "A".."G", "score": 1..100, "certificate": 20 hex digits}
                           (the rating is the score's EPC band: A 92+, B 81+, C 69+ ... G 1-20)
          flood_risk       {"band": "very low" | "low" | "medium" | "high"}
          any other stage  {"reference": 16 hex digits, "value": 0..99, "band": "A".."E"}
        404 {"error": "address not found"} from locate_address for an address containing the
        word "nowhere" (any case): the permanent error tests need.

Scripted faults, per stage (the control endpoints answer 200 with the stage's script)
    POST /_control/script {"stage": S, "fail_next": N, "status": 503, "hang": true, "delay_seconds": 3.0}
        Every field but stage is optional; those sent replace the stage's current ones.
        fail_next: the next N calls to S answer `status` (400-599, default 500) with
          {"error": "scripted failure"}; a call takes its place in that count when it arrives.
        hang: calls to S wait until released (or reset), at most `max_hang_seconds` (600 s), after
          which they answer 504 {"error": "scripted hang was not released"}; false releases them.
        delay_seconds: S's latency instead of the simulator's (null: back to it).
        They combine: a call arrives, takes a scripted failure if one is left, hangs if S hangs,
        waits S's latency, then answers (scripted failure, else not found, else the answer).
    POST /_control/release {"stage": S}: releases S's hung calls and clears its hang;
        the answer's "released" is how many calls were waiting.
    POST /_control/reset: releases every hung call, clears every script and the call log.
    GET /_control/calls[?address=TEXT]
        {"by_stage": {stage: n, ...}, "calls": [{"stage", "address", "status", "at"}, ...]}: every
        call that reached /lookup (scripted failures, 404s and hung calls too; not a request refused
        with 422), in arrival order, logged when it arrives: "status" is null until it is answered.
        The newest CALL_LOG_LIMIT calls are kept; "dropped" says how many older ones were let go.
    GET /healthz: {"status": "ok"}

The state lives in app.state.simulator and is touched only from the event loop, by synchronous
methods (no await inside one), so concurrent requests never see a half-made change; the awaits
(latency, hangs) come between them. One process: run it with one uvicorn worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import Counter, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

STAGE_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"
MAX_ADDRESS_LENGTH = 300
#: The longest a scripted hang holds a call.
MAX_HANG_SECONDS = 600.0
CALL_LOG_LIMIT = 50_000
#: How long `serve_simulator` lets requests in flight finish on SIGTERM (a hung call would take 600 s).
GRACEFUL_SHUTDOWN_SECONDS = 2
LISTENING = "provider simulator listening on"

_UNKNOWN_ADDRESS = re.compile(r"\bnowhere\b", re.IGNORECASE)
_FLOOD_BANDS = ("very low", "low", "medium", "high")
#: EPC bands: the lowest score of each rating.
_ENERGY_BANDS = (("A", 92), ("B", 81), ("C", 69), ("D", 55), ("E", 39), ("F", 21), ("G", 1))
_POSTCODE_AREA = "ABCDEFGHJKLMNPRSTUWY"
_POSTCODE_UNIT = "ABDEFGHJLNPQRSTUWXYZ"

Stage = Annotated[str, Path(pattern=STAGE_PATTERN)]


def answer(stage: str, address: str) -> dict[str, Any]:
    """The provider's answer for `address` at `stage`: the same on every call and in every process."""
    d = hashlib.sha256(f"{stage}|{address}".encode()).digest()
    if stage == "locate_address":
        return {
            "uprn": 10**11 + int.from_bytes(d[0:8]) % (9 * 10**11),
            "latitude": round(49.9 + int.from_bytes(d[8:12]) / 2**32 * (58.7 - 49.9), 6),
            "longitude": round(-8.0 + int.from_bytes(d[12:16]) / 2**32 * (1.8 - -8.0), 6),
            "postcode": f"{_POSTCODE_AREA[d[16] % 20]}{_POSTCODE_AREA[d[17] % 20]}{d[18] % 98 + 1} "
                        f"{d[19] % 10}{_POSTCODE_UNIT[d[20] % 20]}{_POSTCODE_UNIT[d[21] % 20]}",
        }
    if stage == "energy_register":
        score = d[0] % 100 + 1
        rating = next(letter for letter, lowest in _ENERGY_BANDS if score >= lowest)
        return {"rating": rating, "score": score, "certificate": d[1:11].hex()}
    if stage == "flood_risk":
        return {"band": _FLOOD_BANDS[d[0] % 4]}
    return {"reference": d[0:8].hex(), "value": d[8] % 100, "band": "ABCDE"[d[9] % 5]}


class ScriptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str = Field(pattern=STAGE_PATTERN)
    fail_next: int | None = Field(None, ge=0, le=100_000)
    status: int | None = Field(None, ge=400, le=599)
    hang: bool | None = None
    delay_seconds: float | None = Field(None, ge=0, le=MAX_HANG_SECONDS)


class StageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str = Field(pattern=STAGE_PATTERN)


@dataclass
class Script:
    fail_next: int = 0
    status: int = 500
    hang: bool = False
    delay_seconds: float | None = None


@dataclass
class Arrival:
    """What one call to /lookup is to do, decided when it arrives."""

    entry: dict[str, Any]
    fail_status: int | None
    gate: asyncio.Event | None
    delay: float


class Simulator:
    """Scripts, hung calls and the call log. Every method is synchronous: see the module docstring."""

    def __init__(self, latency_seconds: float, max_hang_seconds: float) -> None:
        self.latency_seconds = latency_seconds
        self.max_hang_seconds = max_hang_seconds
        self.scripts: dict[str, Script] = {}
        self.calls: deque[dict[str, Any]] = deque(maxlen=CALL_LOG_LIMIT)
        self.arrivals = 0
        #: One event per hanging stage, made in the event loop by the first call it holds.
        self.gates: dict[str, asyncio.Event] = {}
        self.waiting: Counter[str] = Counter()

    def arrive(self, stage: str, address: str) -> Arrival:
        entry = {"stage": stage, "address": address, "status": None, "at": datetime.now(UTC).isoformat()}
        self.calls.append(entry)
        self.arrivals += 1
        script = self.scripts.get(stage, Script())
        fail_status = None
        if script.fail_next > 0:
            script.fail_next -= 1
            fail_status = script.status
        gate = None
        if script.hang:
            gate = self.gates.setdefault(stage, asyncio.Event())
            self.waiting[stage] += 1  # until _answer's wait ends
        delay = self.latency_seconds if script.delay_seconds is None else script.delay_seconds
        return Arrival(entry, fail_status, gate, delay)

    def set_script(self, request: ScriptRequest) -> dict[str, Any]:
        script = self.scripts.setdefault(request.stage, Script())
        given = request.model_fields_set
        if request.fail_next is not None:
            script.fail_next = request.fail_next
        if request.status is not None:
            script.status = request.status
        if "delay_seconds" in given:
            script.delay_seconds = request.delay_seconds
        if request.hang:
            script.hang = True
        elif request.hang is False:
            return self.release(request.stage)
        return self.describe(request.stage)

    def release(self, stage: str) -> dict[str, Any]:
        released = self.waiting[stage]
        self.scripts.setdefault(stage, Script()).hang = False
        gate = self.gates.pop(stage, None)
        if gate is not None:
            gate.set()
        return {**self.describe(stage), "released": released}

    def reset(self) -> dict[str, Any]:
        for gate in self.gates.values():
            gate.set()
        self.gates.clear()
        self.scripts.clear()
        self.calls.clear()
        self.arrivals = 0
        return {"scripts": {}}

    def describe(self, stage: str) -> dict[str, Any]:
        script = self.scripts.get(stage, Script())
        return {"stage": stage, "fail_next": script.fail_next, "status": script.status, "hang": script.hang,
                "delay_seconds": script.delay_seconds, "latency_seconds": self.latency_seconds,
                "waiting": self.waiting[stage]}

    def call_log(self, address: str | None) -> dict[str, Any]:
        calls = [dict(c) for c in self.calls if address is None or c["address"] == address]
        by_stage = Counter(c["stage"] for c in calls)
        return {"by_stage": dict(sorted(by_stage.items())), "calls": calls,
                "dropped": self.arrivals - len(self.calls)}


def create_simulator(*, latency_seconds: float = 0.05, max_hang_seconds: float = MAX_HANG_SECONDS) -> FastAPI:
    """The simulator's app, with its own fresh state; `latency_seconds` is every stage's default latency."""
    if not latency_seconds >= 0 or not max_hang_seconds > 0:
        raise ValueError("latency_seconds must be >= 0 and max_hang_seconds > 0")
    app = FastAPI(title="recalq provider simulator", docs_url=None, redoc_url=None)
    simulator = app.state.simulator = Simulator(latency_seconds, max_hang_seconds)

    @app.get("/lookup/{stage}")
    async def lookup(stage: Stage,
                     address: Annotated[str, Query(min_length=1, max_length=MAX_ADDRESS_LENGTH)]) -> JSONResponse:
        arrival = simulator.arrive(stage, address)
        status, body = await _answer(simulator, stage, address, arrival)
        arrival.entry["status"] = status
        return JSONResponse(body, status_code=status)

    @app.post("/_control/script")
    async def script(request: ScriptRequest) -> dict[str, Any]:
        return simulator.set_script(request)

    @app.post("/_control/release")
    async def release(request: StageRequest) -> dict[str, Any]:
        return simulator.release(request.stage)

    @app.post("/_control/reset")
    async def reset() -> dict[str, Any]:
        return simulator.reset()

    @app.get("/_control/calls")
    async def calls(address: str | None = None) -> dict[str, Any]:
        return simulator.call_log(address)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


async def _answer(simulator: Simulator, stage: str, address: str, arrival: Arrival) -> tuple[int, dict[str, Any]]:
    if arrival.gate is not None:
        try:
            await asyncio.wait_for(arrival.gate.wait(), simulator.max_hang_seconds)
        except TimeoutError:
            return 504, {"error": "scripted hang was not released"}
        finally:
            simulator.waiting[stage] -= 1
    if arrival.delay > 0:
        await asyncio.sleep(arrival.delay)
    if arrival.fail_status is not None:
        return arrival.fail_status, {"error": "scripted failure"}
    if stage == "locate_address" and _UNKNOWN_ADDRESS.search(address):
        return 404, {"error": "address not found"}
    return 200, {"stage": stage, "address": address, "answer": answer(stage, address)}


class _Server(uvicorn.Server):
    """Says where it listens once it does, with the port the system chose for port 0, and
    remembers the signal that stopped it (uvicorn's own re-raise of it after the shutdown does
    not reach the caller reliably: an ignored or already-handled signal is lost)."""

    stopped_by: int | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.stopped_by = self.stopped_by or sig
        super().handle_exit(sig, frame)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            port = self.servers[0].sockets[0].getsockname()[1]
            host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
            print(f"{LISTENING} http://{host}:{port}", flush=True)


def serve_simulator(host: str, port: int, latency_seconds: float) -> int | None:
    """Serves the simulator until SIGINT/SIGTERM; prints `provider simulator listening on http://HOST:PORT`.
    Returns the signal that stopped it."""
    config = uvicorn.Config(
        create_simulator(latency_seconds=latency_seconds), host=host, port=port,
        log_config=None,  # through the root handler, like `recalq api`
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = _Server(config)
    server.run()
    return server.stopped_by
