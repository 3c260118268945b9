"""The `recalq demo` script: sample data and a few changes, with each score printed as it lands.

Every change goes through the real service functions, so it commits with its outbox row and
the score arrives later from the worker, exactly as in production. What is printed comes from
the database (the properties table, the score history and compliance_recalc_queue), not from
what the script expects, so the demo shows what the system did.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta

import psycopg

from services import evaluations
from services.documents import NewDocument, add_documents, delete_document, reject_document, verify_document
from services.properties import NewProperty, provision_client
from services.scoring import DocumentStatus
from services.vocabulary import Actor, ActorType, TriggerReason

CLIENT = Actor(ActorType.CLIENT, "demo-client")
ADMIN = Actor(ActorType.ADMIN, "demo-admin")
#: How long one change may take to land before the demo calls it stuck.
SETTLE_TIMEOUT_SECONDS = 60.0
#: How long the demo's evaluation may take (a dozen look-ups of the simulator's latency).
EVALUATION_TIMEOUT_SECONDS = 120.0
#: The latest requests, newest job first: job_id is the order the queue view reads from an index.
LATEST_REQUESTS = "SELECT * FROM compliance_recalc_queue ORDER BY job_id DESC LIMIT 50"

_WATCH = """
SELECT p.id, p.name, p.compliance_score, p.compliance_score_pending, h.job_id,
       (SELECT string_agg(DISTINCT r.trigger_reason, ', ') FROM outbox_request r WHERE r.job_id = h.job_id),
       q.trigger_reason, q.status::text
  FROM properties p
  LEFT JOIN LATERAL (SELECT job_id FROM property_compliance_score_history
                      WHERE property_id = p.id ORDER BY id DESC LIMIT 1) h ON true
  LEFT JOIN LATERAL (SELECT trigger_reason, status FROM compliance_recalc_queue
                      WHERE property_id = p.id AND status IN ('pending', 'published', 'running', 'retrying')
                      ORDER BY job_id DESC, created_at DESC LIMIT 1) q ON true
 WHERE p.id = ANY(%(ids)s)
 ORDER BY p.id
"""


@dataclass
class _Shown:
    name: str
    score: int | None = None
    job_id: int | None = None
    updating: str | None = None  # the trigger announced with "Updating…", until the score lands


class ScoreWatcher:
    """Prints "Updating…" when a property's score goes stale and "old -> new" when it lands."""

    def __init__(self, conn: psycopg.Connection, say: Callable[[str], None]) -> None:
        self._conn = conn
        self._say = say
        self._shown: dict[int, _Shown] = {}

    def watch(self, property_id: int, name: str) -> None:
        self._shown[property_id] = _Shown(name)

    def poll(self) -> bool:
        """Prints what changed since the last poll; True when no watched score is pending."""
        rows = self._conn.execute(_WATCH, {"ids": list(self._shown)}).fetchall()
        self._conn.commit()
        settled = True
        for pid, name, score, pending, job_id, landed_for, queued_for, queued_status in rows:
            shown = self._shown[pid]
            label = f'property {pid} "{name}"'
            if pending:
                settled = False
                if shown.updating is None:
                    shown.updating = queued_for or "change"
                    self._say(f"  {label}: {_score(shown.score)} -> Updating… ({shown.updating}, {queued_status})")
            elif job_id != shown.job_id or shown.updating is not None:
                why = landed_for or shown.updating or "recalculation"
                self._say(f"  {label}: {_score(shown.score)} -> {_score(score)} ({why})")
                shown.score, shown.job_id, shown.updating = score, job_id, None
        return settled

    def settle(self, stop: threading.Event, timeout: float = SETTLE_TIMEOUT_SECONDS) -> bool:
        """Polls until every watched score has landed; False on stop or timeout."""
        waited = 0.0
        while not self.poll():
            if stop.wait(0.1):
                return False
            waited += 0.1
            if waited >= timeout:
                self._say(f"a score did not land within {timeout:.0f} s; see the queue: {LATEST_REQUESTS}")
                return False
        return True


def run(database_url: str, *, say: Callable[[str], None], stop: threading.Event, pace: float,
        keep_running: bool = False) -> bool:
    """Runs the script; True when every change's score landed, False if one did not (or on stop)."""
    today = date.today()
    with psycopg.connect(database_url) as conn:
        watcher = ScoreWatcher(conn, say)

        say("provisioning a client with three properties (each gets its first score from the worker)")
        client = provision_client(
            conn,
            name="Acme Lettings (demo)",
            properties=[
                NewProperty("12 High St"),
                NewProperty("Flat 2, 9 Station Rd"),
                NewProperty("4 Mill Lane", has_gas_supply=False),
            ],
            actor=ADMIN,
            correlation_id=_cid(),
        )
        conn.commit()
        high_st, station_rd, mill_lane = (p.property_id for p in client.properties)
        for pid, name in ((high_st, "12 High St"), (station_rd, "Flat 2, 9 Station Rd"), (mill_lane, "4 Mill Lane")):
            watcher.watch(pid, name)
        if not watcher.settle(stop):
            return stop.is_set()

        say("the client uploads certificates (some verified, some waiting for review)")
        uploaded = {}
        for pid, docs in (
            (high_st, [_doc("gas_safety", today, 365, DocumentStatus.VERIFIED),
                       _doc("eicr", today, 4 * 365),
                       _doc("epc", today, 8 * 365, DocumentStatus.VERIFIED)]),
            (station_rd, [_doc("smoke_co_alarms", today, 365, DocumentStatus.VERIFIED),
                          _doc("fire_risk_assessment", today, 2 * 365)]),
            (mill_lane, [_doc("epc", today, 6 * 365, DocumentStatus.VERIFIED),
                         _doc("legionella", today, 2 * 365)]),
        ):
            added = add_documents(conn, property_id=pid, documents=docs, source="client", actor=CLIENT,
                                  trigger=TriggerReason.CLIENT_UPLOAD, correlation_id=_cid())
            conn.commit()
            uploaded.update({(pid, d.requirement_code): i for d, i in zip(docs, added.document_ids, strict=True)})
        if not watcher.settle(stop):
            return stop.is_set()

        steps: list[tuple[str, Callable[[], object]]] = [
            ('an admin verifies the EICR of "12 High St"',
             lambda: verify_document(conn, document_id=uploaded[high_st, "eicr"], actor=ADMIN,
                                     correlation_id=_cid())),
            ('an admin rejects the fire risk assessment of "Flat 2, 9 Station Rd"',
             lambda: reject_document(conn, document_id=uploaded[station_rd, "fire_risk_assessment"],
                                     reason="unsigned", actor=ADMIN, correlation_id=_cid())),
            ('an admin uploads a verified EICR for "4 Mill Lane"',
             lambda: add_documents(conn, property_id=mill_lane, source="admin", actor=ADMIN,
                                   trigger=TriggerReason.ADMIN_UPLOAD, correlation_id=_cid(),
                                   documents=[_doc("eicr", today, 5 * 365, DocumentStatus.VERIFIED)])),
            ('the client deletes the EPC of "12 High St"',
             lambda: delete_document(conn, document_id=uploaded[high_st, "epc"], actor=CLIENT,
                                     trigger=TriggerReason.CLIENT_DELETE, correlation_id=_cid())),
        ]
        for description, change in steps:
            if stop.wait(pace):
                return True
            say(description)
            change()
            conn.commit()
            if not watcher.settle(stop):
                return stop.is_set()

        if not _evaluate(conn, client.client_id, high_st, "12 High St", say, stop):
            return stop.is_set()

    if keep_running:
        say(f"done: every score landed. Still running: client {client.client_id}'s properties, their scores and "
            "the queue, in psql:")
    else:
        # The demo stops its embedded database as it exits: say how to look at what it left.
        say(f"done: every score landed. The data stays in the data directory: start `recalq up` (or next time "
            f"`recalq demo --keep-running`) and look at client {client.client_id}'s properties, their scores and "
            "the queue in psql:")
    # Printed for the user to paste into psql, never executed here.
    say(f"  SELECT id, name, compliance_score FROM properties WHERE client_id = {client.client_id};")  # noqa: S608
    say(f"  SELECT * FROM compliance_recalc_queue WHERE client_id = {client.client_id}"  # noqa: S608
        " ORDER BY job_id DESC LIMIT 50;")
    return True


def _evaluate(conn: psycopg.Connection, client_id: int, property_id: int, name: str, say: Callable[[str], None],
              stop: threading.Event, timeout: float = EVALUATION_TIMEOUT_SECONDS) -> bool:
    """Submits an evaluation of the property and prints each stage as it starts, then what it found."""
    say(f'the client asks for an evaluation of "{name}" (a dozen look-ups on the evaluation worker)')
    job_id = evaluations.request_evaluation(conn, client_id=client_id, property_id=property_id, address=name,
                                            correlation_id=_cid())
    conn.commit()
    display = {stage.key: stage.display for stage in evaluations.STAGES}
    seen = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = conn.execute("SELECT seq, kind::text, data FROM outbox_event WHERE job_id = %s AND seq > %s "
                            "ORDER BY seq", [job_id, seen]).fetchall()
        conn.commit()
        for seq, kind, data in rows:
            seen = seq
            if kind == "progress" and data.get("stage") in display:
                say(f"  evaluation: {display[data['stage']]}")
            elif kind == "complete":
                found = evaluations.snapshot_of_client(conn, client_id, int(data["result"]["evaluation_id"]))
                conn.commit()
                say(f"  evaluation {found.id} done: energy rating {found.summary.get('energy_rating')}, flood risk "
                    f"{found.summary.get('flood_risk')} (GET /api/evaluations/{found.id}; job {job_id})")
                return True
            elif kind in ("error", "cancelled"):
                say(f"  evaluation job {job_id} ended {kind}: {data}")
                return False
        if stop.wait(0.2):
            return False
    say(f"the evaluation (job {job_id}) did not finish within {timeout:.0f} s")
    return False


def _doc(requirement: str, today: date, days_valid: int,
         status: DocumentStatus = DocumentStatus.PENDING_VERIFICATION) -> NewDocument:
    content = f"%PDF- demo {requirement} {uuid.uuid4()}".encode()
    return NewDocument(requirement, f"{requirement}.pdf", len(content), hashlib.sha256(content).hexdigest(),
                       today + timedelta(days=days_valid), status)


def _cid() -> str:
    return f"demo-{uuid.uuid4()}"


def _score(score: int | None) -> str:
    return "—" if score is None else str(score)
