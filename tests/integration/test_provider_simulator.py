"""The provider simulator over real sockets: uvicorn serving it in a thread of the test process
(tests.harness.api_server), and once as the `recalq simulator` command in a subprocess.

Hung calls are held by a thread pool and waited for with bounded waits; no test sleeps for
correctness: each polls the simulator's call log for the state it needs.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from recalq import cli
from recalq.provider_simulator import create_simulator
from tests.harness.api_server import serving
from tests.harness.system import wait_until

ROOT = Path(__file__).resolve().parents[2]
ADDRESS = "1 High Street, Anytown"
OTHER_ADDRESS = "2 Low Road, Elsewhere"
STAGES = ("locate_address", "energy_register", "flood_risk", "crime", "radon")
FLOOD_BANDS = {"very low", "low", "medium", "high"}
POSTCODE = re.compile(r"^[A-Z]{2}[0-9]{1,2} [0-9][A-Z]{2}$")
HEX = re.compile(r"^[0-9a-f]+$")
EPC_LOWEST = {"A": 92, "B": 81, "C": 69, "D": 55, "E": 39, "F": 21, "G": 1}
LISTENING = re.compile(r"provider simulator listening on (http://127\.0\.0\.1:(\d+))$")


@pytest.fixture
def sim() -> Iterator[str]:
    """A simulator with no latency; yields its base URL."""
    with serving(create_simulator(latency_seconds=0.0)) as base:
        yield base


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


def lookup(base: str, stage: str, address: str, timeout: float = 10) -> httpx.Response:
    return httpx.get(f"{base}/lookup/{stage}", params={"address": address}, timeout=timeout)


def control(base: str, action: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{base}/_control/{action}", json=body, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def calls(base: str, address: str | None = None) -> dict[str, Any]:
    params = {} if address is None else {"address": address}
    response = httpx.get(f"{base}/_control/calls", params=params, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def timed_lookup(base: str, stage: str, address: str = ADDRESS) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = lookup(base, stage, address)
    return response, time.monotonic() - started


def answers(base: str, address: str) -> dict[str, dict[str, Any]]:
    found = {}
    for stage in STAGES:
        response = lookup(base, stage, address)
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["stage"], body["address"]) == (stage, address)
        found[stage] = body["answer"]
    return found


def test_the_same_address_gets_the_same_answer_every_time_and_from_a_fresh_simulator(sim: str) -> None:
    first = answers(sim, ADDRESS)
    again = answers(sim, ADDRESS)
    with serving(create_simulator(latency_seconds=0.0)) as fresh:
        from_fresh = answers(fresh, ADDRESS)

    assert first == again == from_fresh


def test_different_addresses_and_different_stages_get_different_answers(sim: str) -> None:
    one, other = answers(sim, ADDRESS), answers(sim, OTHER_ADDRESS)

    assert one["locate_address"] != other["locate_address"]
    assert one["energy_register"]["certificate"] != other["energy_register"]["certificate"]
    assert one["crime"]["reference"] != other["crime"]["reference"]
    assert one["crime"]["reference"] != one["radon"]["reference"]


def test_every_answer_has_its_stages_shape_for_many_addresses(sim: str) -> None:
    found = [answers(sim, f"{n} Test Terrace, Sampleton") for n in range(40)]

    for each in found:
        place = each["locate_address"]
        assert set(place) == {"uprn", "latitude", "longitude", "postcode"}
        assert isinstance(place["uprn"], int) and len(str(place["uprn"])) == 12
        assert 49.9 <= place["latitude"] <= 58.7 and -8.0 <= place["longitude"] <= 1.8
        assert POSTCODE.match(place["postcode"]), place["postcode"]
        energy = each["energy_register"]
        assert set(energy) == {"rating", "score", "certificate"}
        assert 1 <= energy["score"] <= 100 and HEX.match(energy["certificate"])
        # the rating is the score's EPC band
        assert energy["score"] >= EPC_LOWEST[energy["rating"]]
        better = chr(ord(energy["rating"]) - 1)
        assert better not in EPC_LOWEST or energy["score"] < EPC_LOWEST[better]
        assert set(each["flood_risk"]) == {"band"} and each["flood_risk"]["band"] in FLOOD_BANDS
        for stage in ("crime", "radon"):
            generic = each[stage]
            assert set(generic) == {"reference", "value", "band"}
            assert HEX.match(generic["reference"]) and 0 <= generic["value"] <= 99 and generic["band"] in "ABCDE"
    # answers spread over their ranges rather than sticking to one value
    assert len({each["flood_risk"]["band"] for each in found}) >= 3
    assert len({each["energy_register"]["rating"] for each in found}) >= 3
    assert len({each["locate_address"]["uprn"] for each in found}) == 40


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_fail_next_fails_exactly_that_many_calls_of_that_stage_with_the_scripted_status(sim: str, status: int) -> None:
    scripted = control(sim, "script", stage="flood_risk", fail_next=2, status=status)

    first = lookup(sim, "flood_risk", ADDRESS)
    other_stage = lookup(sim, "crime", ADDRESS)
    second = lookup(sim, "flood_risk", OTHER_ADDRESS)
    third = lookup(sim, "flood_risk", ADDRESS)

    assert (scripted["stage"], scripted["fail_next"], scripted["status"]) == ("flood_risk", 2, status)
    assert [first.status_code, second.status_code, third.status_code] == [status, status, 200]
    assert first.json() == second.json() == {"error": "scripted failure"}
    assert other_stage.status_code == 200, "another stage's calls neither fail nor use up the script"
    assert third.json()["answer"]["band"] in FLOOD_BANDS
    assert control(sim, "script", stage="flood_risk")["fail_next"] == 0


def test_a_scripted_failure_without_a_status_is_a_500(sim: str) -> None:
    control(sim, "script", stage="licensing", fail_next=1)

    assert [lookup(sim, "licensing", ADDRESS).status_code for _ in range(2)] == [500, 200]


def test_hung_calls_wait_until_released_then_answer_while_other_stages_keep_answering(
    sim: str, pool: ThreadPoolExecutor
) -> None:
    assert control(sim, "script", stage="radon", hang=True)["hang"] is True
    held = [pool.submit(lookup, sim, "radon", address) for address in (ADDRESS, OTHER_ADDRESS)]
    wait_until(lambda: calls(sim)["by_stage"].get("radon") == 2, 10, "both radon calls to arrive")

    other_stage = lookup(sim, "crime", ADDRESS)
    waiting = control(sim, "script", stage="radon")["waiting"]
    still_held = [not f.done() for f in held]
    released = control(sim, "release", stage="radon")
    responses = [f.result(timeout=10) for f in held]
    after_release = lookup(sim, "radon", ADDRESS, timeout=5)

    assert other_stage.status_code == 200
    assert (waiting, still_held) == (2, [True, True])
    assert (released["released"], released["hang"]) == (2, False)
    assert [r.status_code for r in responses] == [200, 200]
    assert after_release.status_code == 200, "a released stage no longer hangs"
    assert responses[0].json() == after_release.json()
    assert control(sim, "script", stage="radon")["waiting"] == 0


def test_hang_false_releases_like_release_does(sim: str, pool: ThreadPoolExecutor) -> None:
    control(sim, "script", stage="planning", hang=True)
    held = pool.submit(lookup, sim, "planning", ADDRESS)
    wait_until(lambda: calls(sim)["by_stage"].get("planning") == 1, 10, "the planning call to arrive")

    unhung = control(sim, "script", stage="planning", hang=False)

    assert (unhung["released"], unhung["hang"]) == (1, False)
    assert held.result(timeout=10).status_code == 200


def test_a_hang_never_released_answers_504_after_the_cap() -> None:
    with serving(create_simulator(latency_seconds=0.0, max_hang_seconds=0.4)) as base:
        control(base, "script", stage="broadband", hang=True)

        response, took = timed_lookup(base, "broadband")

        assert (response.status_code, response.json()) == (504, {"error": "scripted hang was not released"})
        assert took >= 0.4
        assert [c["status"] for c in calls(base)["calls"]] == [504]


def test_a_stage_delay_replaces_the_simulators_latency_for_that_stage_only_and_null_restores_it() -> None:
    with serving(create_simulator(latency_seconds=0.5)) as base:
        default, default_took = timed_lookup(base, "crime")
        control(base, "script", stage="radon", delay_seconds=0)
        quick, quick_took = timed_lookup(base, "radon")
        slow_script = control(base, "script", stage="crime", delay_seconds=1.0)
        slow, slow_took = timed_lookup(base, "crime")
        control(base, "script", stage="crime", delay_seconds=None)
        restored, restored_took = timed_lookup(base, "crime")
        control(base, "script", stage="council_tax", fail_next=1, status=502, delay_seconds=0.3)
        slow_failure, slow_failure_took = timed_lookup(base, "council_tax")

    assert [r.status_code for r in (default, quick, slow, restored)] == [200] * 4
    assert default_took >= 0.5
    assert quick_took < 0.5, "radon's delay of 0 replaced the simulator's 0.5 s"
    assert (slow_script["delay_seconds"], slow_script["latency_seconds"]) == (1.0, 0.5)
    assert slow_took >= 1.0
    assert 0.5 <= restored_took < 1.0
    assert slow_failure.status_code == 502 and slow_failure_took >= 0.3, "fields combine: a slow failure"


def test_the_call_log_counts_every_arrival_including_failures_not_found_and_hung_calls(
    sim: str, pool: ThreadPoolExecutor
) -> None:
    control(sim, "script", stage="flood_risk", fail_next=1, status=503)
    statuses = [lookup(sim, "flood_risk", ADDRESS).status_code, lookup(sim, "flood_risk", ADDRESS).status_code,
                lookup(sim, "locate_address", "9 Nowhere Close").status_code]
    control(sim, "script", stage="radon", hang=True)
    held = pool.submit(lookup, sim, "radon", OTHER_ADDRESS)
    wait_until(lambda: calls(sim)["by_stage"].get("radon") == 1, 10, "the radon call to arrive")

    log = calls(sim)
    other = calls(sim, address=OTHER_ADDRESS)
    control(sim, "release", stage="radon")
    held.result(timeout=10)
    answered = calls(sim, address=OTHER_ADDRESS)

    assert statuses == [503, 200, 404]
    assert log["by_stage"] == {"flood_risk": 2, "locate_address": 1, "radon": 1}
    assert [(c["stage"], c["address"], c["status"]) for c in log["calls"]] == [
        ("flood_risk", ADDRESS, 503),
        ("flood_risk", ADDRESS, 200),
        ("locate_address", "9 Nowhere Close", 404),
        ("radon", OTHER_ADDRESS, None),  # logged when it arrived, not answered yet
    ]
    times = [datetime.fromisoformat(c["at"]) for c in log["calls"]]
    assert all(t.tzinfo is not None for t in times) and times == sorted(times)
    assert log["dropped"] == 0
    assert other["by_stage"] == {"radon": 1} and len(other["calls"]) == 1
    assert [c["status"] for c in answered["calls"]] == [200]


@pytest.mark.parametrize("address", ["12 Nowhere Lane", "NOWHERE", "the middle of nowhere"])
def test_an_address_with_the_word_nowhere_is_not_found_by_locate_address(sim: str, address: str) -> None:
    response = lookup(sim, "locate_address", address)

    assert (response.status_code, response.json()) == (404, {"error": "address not found"})
    assert lookup(sim, "flood_risk", address).status_code == 200, "only locate_address does not know it"


def test_nowhere_inside_a_longer_word_is_an_address_like_any_other(sim: str) -> None:
    assert lookup(sim, "locate_address", "3 Nowhereville Road").status_code == 200


@pytest.mark.parametrize(
    ("stage", "params"),
    [
        ("Flood", {"address": ADDRESS}),
        ("1flood", {"address": ADDRESS}),
        ("_flood", {"address": ADDRESS}),
        ("flood-risk", {"address": ADDRESS}),
        ("a" * 41, {"address": ADDRESS}),
        ("flood_risk", {}),
        ("flood_risk", {"address": ""}),
        ("flood_risk", {"address": "x" * 301}),
    ],
)
def test_a_bad_stage_name_or_address_is_refused_with_422_and_not_logged(
    sim: str, stage: str, params: dict[str, str]
) -> None:
    response = httpx.get(f"{sim}/lookup/{stage}", params=params, timeout=10)

    assert response.status_code == 422, response.text
    assert calls(sim)["calls"] == []


def test_the_longest_stage_name_and_address_are_accepted(sim: str) -> None:
    assert lookup(sim, "a" * 40, "x" * 300).status_code == 200


@pytest.mark.parametrize(
    ("action", "body"),
    [
        ("script", {"stage": "Flood", "fail_next": 1}),
        ("script", {"fail_next": 1}),
        ("script", {"stage": "flood_risk", "fail_next": -1}),
        ("script", {"stage": "flood_risk", "fail_next": 1, "status": 200}),
        ("script", {"stage": "flood_risk", "delay_seconds": -1}),
        ("script", {"stage": "flood_risk", "fail_nxt": 1}),
        ("release", {"stage": "flood-risk"}),
    ],
)
def test_a_bad_control_body_is_refused_with_422_and_changes_nothing(sim: str, action: str, body: Any) -> None:
    response = httpx.post(f"{sim}/_control/{action}", json=body, timeout=10)

    assert response.status_code == 422, response.text
    assert lookup(sim, "flood_risk", ADDRESS).status_code == 200


def test_reset_releases_hung_calls_and_clears_every_script_and_the_call_log(
    sim: str, pool: ThreadPoolExecutor
) -> None:
    control(sim, "script", stage="flood_risk", fail_next=5, status=503, delay_seconds=30)
    control(sim, "script", stage="radon", hang=True)
    held = pool.submit(lookup, sim, "radon", ADDRESS)
    wait_until(lambda: calls(sim)["by_stage"].get("radon") == 1, 10, "the radon call to arrive")

    control(sim, "reset")
    hung = held.result(timeout=10)
    emptied = calls(sim)
    flood, flood_took = timed_lookup(sim, "flood_risk")
    radon = lookup(sim, "radon", ADDRESS, timeout=5)

    assert hung.status_code == 200
    assert emptied == {"by_stage": {}, "calls": [], "dropped": 0}
    assert flood.status_code == 200 and flood_took < 5, "the failures and the delay are gone"
    assert radon.status_code == 200
    assert calls(sim)["by_stage"] == {"flood_risk": 1, "radon": 1}
    assert control(sim, "script", stage="flood_risk")["fail_next"] == 0


def test_healthz_answers_ok(sim: str) -> None:
    response = httpx.get(f"{sim}/healthz", timeout=10)

    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_the_simulator_command_prints_the_port_it_chose_and_serves_the_same_answers(sim: str) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RECALQ_") and k not in {"DATABASE_URL", "BROKER_URL"}}
    process = subprocess.Popen(
        [sys.executable, "-m", "recalq", "simulator", "--port", "0", "--latency", "0.3"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # Ctrl-C as a terminal delivers it: a run started in the background (CI's `cmd &`) would
        # otherwise hand the child an ignored SIGINT, and nothing would stop it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: queue.Queue[str] = queue.Queue()
    pump = threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in process.stdout],  # type: ignore[union-attr]
                            daemon=True)
    pump.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 30
        match = None
        while match is None:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and process.poll() is None, "no listening line:\n" + "\n".join(seen)
            try:
                seen.append(lines.get(timeout=remaining))
            except queue.Empty:
                continue
            match = LISTENING.search(seen[-1])
        base, port = match.group(1), int(match.group(2))

        health = httpx.get(f"{base}/healthz", timeout=10)
        answered, took = timed_lookup(base, "locate_address")
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        pump.join(10)
        process.stdout.close()  # type: ignore[union-attr]

    assert port > 0
    assert health.json() == {"status": "ok"}
    assert answered.json() == lookup(sim, "locate_address", ADDRESS).json(), "the same answer in another process"
    assert took >= 0.3, "--latency reached the simulator"
    assert process.returncode == 130, "Ctrl-C stops it as it stops the other commands"


@pytest.mark.parametrize("argv", [["--latency", "-1"], ["--latency", "soon"], ["--port", "70000"]])
def test_the_simulator_command_refuses_bad_arguments_with_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["simulator", *argv])

    assert exited.value.code == 2
