"""The watched toy's submission route, as a real kind would have one; tests mount it on the app
under test (`app.include_router(toy_router())`)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from api.dependencies import Conn, IdempotencyKey
from api.job_submission import submit_job
from api.security import Watcher
from tests.harness.toy_kind import WATCHED_TASK


class ToyIn(BaseModel):
    units: int = 3
    lock: str | None = None  # the kind's lock key, for unique_active tests
    unit_seconds: float = 0


def toy_router() -> APIRouter:
    router = APIRouter()

    @router.post("/api/toy-jobs", status_code=202)
    def submit_toy(body: ToyIn, watcher: Watcher, conn: Conn, key: IdempotencyKey, request: Request) -> Any:
        return submit_job(conn, request, watcher, key, task=WATCHED_TASK,
                          lock_key=body.lock or f"toy:{uuid.uuid4().hex}",
                          payload={"units": body.units, "unit_seconds": body.unit_seconds},
                          values=body.model_dump())

    return router
