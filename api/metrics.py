"""GET /metrics: the queue in the Prometheus text format (recalq/metrics.py says what is in it).

It takes no credentials, like most Prometheus targets: it is meant for the infrastructure, not
for clients. The API listens on loopback by default; where it does not, let the reverse proxy
refuse /metrics from outside. It is left out of the OpenAPI document for the same reason.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from recalq.metrics import DEFAULT_SCRAPE_TIMEOUT_SECONDS, exposition

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    pool = request.app.state.runtime.pool
    # A pooled connection, waited for no longer than a query may run: with the database down the
    # scrape answers recalq_up 0 in seconds instead of after the pool's usual timeout.
    body = exposition(lambda: pool.connection(timeout=DEFAULT_SCRAPE_TIMEOUT_SECONDS))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
