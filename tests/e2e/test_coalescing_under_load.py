"""G3 under load: many concurrent mutations of few properties cost few recalculations, and the
scores that remain are exactly the formula on the final data (G2)."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from datetime import date

import psycopg

from services.documents import delete_document, reject_document, verify_document
from services.errors import DocumentNotFound, InvalidTransition
from services.scoring import REQUIREMENTS, DocumentStatus
from services.vocabulary import Actor, ActorType, TriggerReason
from tests.harness.data import ADMIN, cid, new_document, provision, upload
from tests.harness.invariants import assert_invariants
from tests.harness.observe import assert_fresh_score, connect, history_count
from tests.harness.system import System

THREADS = 16
MUTATIONS = 1200
PROPERTIES = 5
CLIENT = Actor(ActorType.CLIENT, "client-load")
#: An upload cannot carry a rejection (documents need a rejection reason, which uploads lack).
UPLOAD_STATUSES = (DocumentStatus.PENDING_VERIFICATION, DocumentStatus.VERIFIED)
EXPIRIES = (None, date(2001, 1, 1), date(2031, 1, 1), date(2040, 6, 30))


class Mutator(threading.Thread):
    """Makes random uploads, verifies, rejects and deletes on its own connection until the
    shared budget is spent; counts only the mutations that committed."""

    def __init__(self, database_url: str, property_ids: list[int], budget: threading.Semaphore, seed: int) -> None:
        super().__init__(daemon=True, name=f"mutator-{seed}")
        self._database_url = database_url
        self._property_ids = property_ids
        self._budget = budget
        self._random = random.Random(seed)
        self.committed: Counter[int] = Counter()
        self.refused = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with connect(self._database_url) as conn:
                while self._budget.acquire(blocking=False):
                    property_id = self._random.choice(self._property_ids)
                    if self._mutate(conn, property_id):
                        self.committed[property_id] += 1
                    else:
                        self._budget.release()  # a refused change is not a mutation: try another
                        self.refused += 1
        except BaseException as exc:  # reported by the test, which joins every thread
            self.error = exc

    def _mutate(self, conn: psycopg.Connection, property_id: int) -> bool:
        rnd = self._random
        document = conn.execute(
            "SELECT id, status FROM documents WHERE property_id = %s AND deleted_at IS NULL "
            "ORDER BY random() LIMIT 1",
            [property_id],
        ).fetchone()
        action = rnd.random()
        try:
            if document is None or action < 0.3:
                upload(conn, property_id, new_document(rnd.choice(REQUIREMENTS), rnd.choice(EXPIRIES),
                                                       rnd.choice(UPLOAD_STATUSES)))
            elif action < 0.55:
                verify_document(conn, document_id=document[0], actor=ADMIN, correlation_id=cid())
            elif action < 0.8:
                reject_document(conn, document_id=document[0], reason="does not match the address",
                                actor=ADMIN, correlation_id=cid())
            else:
                delete_document(conn, document_id=document[0], actor=CLIENT,
                                trigger=TriggerReason.CLIENT_DELETE, correlation_id=cid())
        except (DocumentNotFound, InvalidTransition):
            return False  # another thread deleted it, or it already has that status
        return True


def test_a_thousand_concurrent_mutations_cost_few_recalculations_and_leave_exact_scores(
    system: System, database_url: str
) -> None:
    with connect(database_url) as conn:
        property_ids = provision(conn, n_properties=PROPERTIES)
    # Two worker processes, one task slot each, for five busy properties: the workers are the
    # bottleneck, which is when coalescing has to keep the backlog at one job per property.
    system.start_worker(concurrency=1)
    system.start_worker(concurrency=1)
    system.start_relay()

    budget = threading.Semaphore(MUTATIONS)
    mutators = [Mutator(database_url, property_ids, budget, seed) for seed in range(THREADS)]
    started = time.monotonic()
    for mutator in mutators:
        mutator.start()
    for mutator in mutators:
        mutator.join(120)
        assert not mutator.is_alive(), f"{mutator.name} did not finish in 120 s"
        assert mutator.error is None, f"{mutator.name} failed: {mutator.error!r}"
    mutating = time.monotonic() - started
    system.wait_idle(timeout=120)
    settled = time.monotonic() - started

    mutations: Counter[int] = sum((m.committed for m in mutators), Counter())
    assert sum(mutations.values()) == MUTATIONS
    with connect(database_url) as conn:
        recalculations = {p: history_count(conn, p) for p in property_ids}
        print(f"\n{MUTATIONS} mutations by {THREADS} threads in {mutating:.1f}s, idle after {settled:.1f}s; "
              f"{sum(m.refused for m in mutators)} refused (raced) changes")
        for p in property_ids:
            print(f"  property {p}: {mutations[p]} mutations, {recalculations[p]} recalculations applied")
        requests = dict(conn.execute(
            "SELECT property_id, count(*) FROM compliance_recalc_queue WHERE status = 'done' GROUP BY property_id"
        ).fetchall())
        for p in property_ids:
            assert requests[p] == mutations[p] + 1, f"property {p}: every mutation (and provisioning) asks once"
            assert_fresh_score(conn, p)
            assert 1 <= recalculations[p] < mutations[p] / 4, (
                f"property {p}: {recalculations[p]} recalculations for {mutations[p]} mutations"
            )
        assert_invariants(conn)
