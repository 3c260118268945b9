"""Client endpoints (bearer token): a client's own properties and documents."""

from __future__ import annotations

from fastapi import APIRouter

from api.problems import COMMON_RESPONSES

router = APIRouter(prefix="/api", tags=["client"], responses=COMMON_RESPONSES)
