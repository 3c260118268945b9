"""Builds the FastAPI app: the composition root of the API process.

`uvicorn --factory api.app:create_app` (what `recalq api` and `recalq up` run) calls
`create_app()` once; the settings object, the connection pool and the file store are made
then, never at import.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api import access_log, metrics, problems
from api.admission import Admission, AdmissionLimits
from api.docs_pages import install_docs
from api.job_stream import JobStreamHub
from api.request_body import BodyLimits, RequestBodyLimits
from api.routes import admin, admin_jobs, client, evaluations, job_events, jobs
from api.security import AdminKeys
from api.stream_tokens import TOKEN_LIFETIME_S, StreamTokens
from api.web import install_web, live
from recalq.bootstrap import Runtime
from recalq.settings import Settings
from services.file_store import FileStore
from services.uploads import UploadLimits

DESCRIPTION = """\
recalq keeps each property's compliance score correct and fresh. Every change (an upload, a
delete, a verification...) commits together with a request to recalculate; the score is then
recomputed in the background. While it is, the property reads `compliance_score_pending: true`
and `status: "updating"`.

* **Client endpoints** take a client's token: `Authorization: Bearer rqc_...`. A client sees
  only its own properties; another client's ids answer 404.
* **Admin endpoints** take `X-API-Key`.
* **Idempotency**: every POST and DELETE has a key: the `Idempotency-Key` you send, or one the
  server makes, returned in the answer's `Idempotency-Key` header (also on a 503). A retry under
  it changes nothing more and answers 200 with the first answer and `Idempotent-Replayed: true`.
* **Errors** are RFC 9457 problem documents (`application/problem+json`) whose `errors` name
  the field, the rule and the valid values.
"""

TAGS = [
    {"name": "client", "description": "A client's own properties and documents (bearer token)."},
    {"name": "admin", "description": "Operators: documents of any property, provisioning, recalculation status, "
     "the queue (X-API-Key)."},
    {"name": "jobs", "description": "Jobs a person starts and watches, of every kind: status, stream, cancel, "
     "resume (the owner's bearer token; admins with X-API-Key see status and errors)."},
    {"name": "health", "description": "Liveness and readiness probes."},
]


class Health(BaseModel):
    status: str


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()
    runtime = Runtime(settings, pool_size=settings.api_db_pool_size, check_connections=True)

    streams = JobStreamHub(settings.conninfo, poll_seconds=settings.api_stream_poll_seconds,
                           channels=(live.CHANNEL,))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await streams.start()
        try:
            yield
        finally:
            await streams.stop()
            runtime.close()

    app = FastAPI(title="recalq", version=version("recalq"), description=DESCRIPTION, openapi_tags=TAGS,
                  lifespan=lifespan, docs_url=None, redoc_url=None)  # install_docs serves them, with no CDN
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.admin_keys = AdminKeys(tuple(k.get_secret_value() for k in settings.admin_api_keys))
    app.state.file_store = FileStore(settings.document_dir)
    app.state.stream_tokens = StreamTokens(
        runtime.connect, rotation_grace_s=max(TOKEN_LIFETIME_S, settings.web_session_seconds))
    app.state.job_streams = streams
    app.state.streams_per_owner = Counter()
    app.state.upload_limits = UploadLimits(
        max_file_bytes=settings.max_file_bytes,
        max_zip_bytes=settings.max_request_bytes,
        max_zip_total_uncompressed=settings.max_zip_total_uncompressed_bytes,
        max_zip_ratio=settings.max_zip_ratio,
    )
    problems.install(app)
    access_log.install()
    app.add_middleware(RequestBodyLimits, limits=BodyLimits(
        max_bytes=settings.max_request_bytes,
        idle_timeout_seconds=settings.api_body_idle_timeout_seconds,
        total_timeout_seconds=settings.api_body_total_timeout_seconds,
    ))
    # Outermost: a request is admitted (or refused at once) before anything reads its body.
    app.add_middleware(Admission, limits=admission_limits(settings))
    app.include_router(client.router)
    app.include_router(admin.router)
    app.include_router(admin_jobs.router)
    app.include_router(job_events.router)
    app.include_router(jobs.router)
    app.include_router(evaluations.router)
    app.include_router(metrics.router)
    install_docs(app)
    install_web(app)

    @app.get("/healthz", tags=["health"], response_model=Health)
    async def healthz() -> Health:
        """The process is up (it does not touch the database, takes no thread and is never queued)."""
        return Health(status="ok")

    @app.get("/readyz", tags=["health"], response_model=Health,
             responses={503: problems.COMMON_RESPONSES[503]})
    def readyz(request: Request) -> Health | JSONResponse:
        """The process can reach its database."""
        with request.app.state.runtime.connection() as conn:
            conn.execute("SELECT 1")
        return Health(status="ready")

    return app


def admission_limits(settings: Settings) -> AdmissionLimits:
    slots = settings.api_max_in_flight or settings.api_db_pool_size
    return AdmissionLimits(
        slots=slots,
        max_waiting=settings.api_max_waiting,
        max_wait_seconds=settings.api_max_wait_seconds,
        tenant_slots=max(1, min(slots, math.floor(slots * settings.api_caller_share))),
        rate=settings.api_caller_rate_per_second,
        burst=settings.api_caller_burst,
        tenant_queue=math.ceil(settings.api_max_waiting * settings.api_caller_share),
    )
