"""Admin endpoints (X-API-Key): any property's documents, provisioning, recalculation status."""

from __future__ import annotations

from fastapi import APIRouter

from api.problems import COMMON_RESPONSES

router = APIRouter(prefix="/api/admin", tags=["admin"], responses=COMMON_RESPONSES)
