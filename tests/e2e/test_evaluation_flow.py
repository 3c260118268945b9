"""Property evaluations end to end with real processes: `recalq api` and `recalq relay`
processes, Celery workers on the evaluations queue, the provider simulator over HTTP, on
RabbitMQ and on Redis. R-B1..R-B5: a submission answers at once, stages are reported as they
run, another API process (a reloaded page) follows the same job, a worker killed mid-stage is
taken over without its finished stages being asked again, SIGTERM mid-stage finishes the stage,
several API and worker processes at once."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest

from services.evaluations import EVALUATE_TASK, EVALUATION_QUEUE, LOOKUPS
from tests.harness.api import TenantClient, new_tenant
from tests.harness.simulator import Simulator, simulator_in_thread
from tests.harness.sse import read_stream
from tests.harness.system import FAST_RESCUE, System, wait_until


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    with simulator_in_thread(latency_seconds=0.02) as running:
        yield running


@pytest.fixture
def evaluation_system(database_url: str, broker_url: str, tmp_path: Path, simulator: Simulator) -> Iterator[System]:
    system = System(database_url, broker_url, tmp_path, extra_env={
        "RECALQ_STORAGE_DIR": str(tmp_path / "documents"), "RECALQ_EVALUATION_PROVIDER_URL": simulator.url,
        "RECALQ_EVALUATION_PROVIDER_TIMEOUT_SECONDS": "30", **FAST_RESCUE,
    })
    with psycopg.connect(database_url, autocommit=True) as conn:
        # A short lease, so a dead worker's evaluation is taken over in seconds (its handler
        # heartbeats at every stage; a hung stage stops the heartbeats).
        conn.execute("UPDATE outbox_task SET lease_seconds = 3 WHERE name = %s", [EVALUATE_TASK])
    system.start_relay()
    yield system
    system.stop()


def submit(api: str, tenant: TenantClient, **body: Any) -> dict[str, Any]:
    answer = httpx.post(f"{api}/api/evaluations", headers={**tenant.headers, "Idempotency-Key": os.urandom(8).hex()},
                        json=body or {"property_id": tenant.property_ids[0]}, timeout=10)
    assert answer.status_code == 202, answer.text
    return answer.json()


def job(api: str, tenant: TenantClient, job_id: int) -> dict[str, Any]:
    return httpx.get(f"{api}/api/jobs/{job_id}", headers=tenant.headers, timeout=10).json()


def wait_done(api: str, tenant: TenantClient, job_id: int, timeout: float = 60) -> dict[str, Any]:
    wait_until(lambda: job(api, tenant, job_id)["status"] in ("done", "failed"), timeout, "the evaluation to end")
    return job(api, tenant, job_id)


def test_an_evaluation_answers_at_once_reports_its_stages_and_is_followed_from_another_api_process(
    evaluation_system: System, simulator: Simulator
) -> None:
    system = evaluation_system
    _, first_api = system.start_api()
    _, second_api = system.start_api()  # the page reloaded, served by another process
    system.start_worker(queue=EVALUATION_QUEUE)
    system.start_worker(queue=EVALUATION_QUEUE)
    tenant = new_tenant(system.database_url)

    submitted = submit(first_api, tenant)
    assert submitted["status"] in ("queued", "running")  # R-B1: at once, before any stage ran

    done = wait_done(second_api, tenant, submitted["id"])  # R-B3: the same job, from anywhere
    assert done["status"] == "done" and done["stage"]["key"] == "saving_results"
    status, events = read_stream(second_api, f"/api/jobs/{submitted['id']}/events", tenant.headers)
    assert status == 200
    # R-B2: the stages as they ran (the replay after the end: snapshot, then the final event;
    # the stored events are the same ones a live watcher got)
    with psycopg.connect(system.database_url) as conn:
        stages = [row[0] for row in conn.execute(
            "SELECT data->>'stage' FROM outbox_event WHERE job_id = %s AND kind = 'progress' ORDER BY seq",
            [submitted["id"]])]
    assert stages == [*LOOKUPS, "saving_results"]
    assert events[-1]["event"] == "complete"
    evaluation = httpx.get(f"{first_api}/api/evaluations/{done['result']['evaluation_id']}", headers=tenant.headers,
                           timeout=10).json()
    assert set(evaluation["answers"]) == set(LOOKUPS)
    assert simulator.calls() == dict.fromkeys(LOOKUPS, 1)


def test_a_worker_killed_mid_stage_is_taken_over_after_its_lease_without_asking_finished_stages_again(
    evaluation_system: System, simulator: Simulator
) -> None:
    system = evaluation_system
    _, api = system.start_api()
    dying = system.start_worker(queue=EVALUATION_QUEUE)
    tenant = new_tenant(system.database_url)
    simulator.script("flood_risk", hang=True)

    job_id = submit(api, tenant)["id"]
    wait_until(lambda: simulator.calls().get("flood_risk", 0) >= 1, 60, "the worker to be inside flood_risk")
    system.kill(dying)  # kill -9, mid-stage
    simulator.release("flood_risk")
    system.start_worker(queue=EVALUATION_QUEUE)

    done = wait_done(api, tenant, job_id)
    assert done["status"] == "done" and done["attempt"] == 2
    calls = simulator.calls()
    before = LOOKUPS[:LOOKUPS.index("flood_risk")]
    assert all(calls[stage] == 1 for stage in before), calls  # answered and checkpointed: never again
    assert calls["flood_risk"] == 2  # the stage in flight is the one asked again
    assert all(calls[stage] == 1 for stage in LOOKUPS[LOOKUPS.index("flood_risk") + 1:]), calls


def test_sigterm_mid_stage_lets_the_stage_finish_and_the_evaluation_is_never_lost(
    evaluation_system: System, simulator: Simulator
) -> None:
    system = evaluation_system
    _, api = system.start_api()
    worker = system.start_worker(queue=EVALUATION_QUEUE)
    tenant = new_tenant(system.database_url)
    simulator.script("planning", delay_seconds=2.0)

    job_id = submit(api, tenant)["id"]
    wait_until(lambda: simulator.calls().get("planning", 0) >= 1, 60, "the worker to be inside planning")
    # To the main process only, as deploy/systemd's KillMode=mixed does: Celery's warm shutdown
    # lets the running task finish (a SIGTERM to the pool child itself would end the task).
    os.kill(worker.popen.pid, signal.SIGTERM)
    assert worker.popen.wait(60) == 0, worker.output()

    done = job(api, tenant, job_id)
    if done["status"] != "done":  # released instead: another worker carries on from the checkpoint
        system.start_worker(queue=EVALUATION_QUEUE)
        done = wait_done(api, tenant, job_id)
    assert done["status"] == "done"
    calls = simulator.calls()
    assert calls["planning"] == 1 and all(n == 1 for n in calls.values()), calls


def test_evaluations_wait_on_their_own_queue_and_never_hold_the_recalculation_workers(
    evaluation_system: System, simulator: Simulator
) -> None:
    system = evaluation_system
    _, api = system.start_api()
    system.start_worker()  # the recalculations' worker only: nobody consumes the evaluations queue
    tenant = new_tenant(system.database_url, n_properties=2)
    evaluations = [submit(api, tenant, property_id=p)["id"] for p in tenant.property_ids]

    # The properties' first scores land while both evaluations wait for workers of their own.
    wait_until(lambda: all(httpx.get(f"{api}/api/properties/{p}", headers=tenant.headers, timeout=10).json()
                           ["status"] == "up_to_date" for p in tenant.property_ids), 60, "the scores to land")
    assert [job(api, tenant, j)["status"] for j in evaluations] == ["queued", "queued"]
    assert simulator.calls() == {}

    system.start_worker(queue=EVALUATION_QUEUE)
    assert [wait_done(api, tenant, j)["status"] for j in evaluations] == ["done", "done"]
