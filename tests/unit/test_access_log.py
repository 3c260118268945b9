"""Secrets in a query string never reach the access log."""

from __future__ import annotations

import logging

import pytest

from api.access_log import RedactQuerySecrets, redact_path


@pytest.mark.parametrize(("path", "logged"), [
    ("/api/properties?token=rqc_secret", "/api/properties?token=[redacted]"),
    ("/api/x?access_token=abc&limit=5", "/api/x?access_token=[redacted]&limit=5"),
    ("/api/x?X-API-Key=k1&api_key=k2", "/api/x?X-API-Key=[redacted]&api_key=[redacted]"),
    ("/api/jobs/1/events?stream_token=s&after=3", "/api/jobs/1/events?stream_token=[redacted]&after=3"),
    ("/api/admin/jobs?status=dead&limit=5", "/api/admin/jobs?status=dead&limit=5"),
    ("/api/properties/7", "/api/properties/7"),
])
def test_the_values_of_secret_looking_parameters_are_redacted_and_the_rest_kept(path: str, logged: str) -> None:
    assert redact_path(path) == logged


def test_the_filter_rewrites_uvicorns_access_record_and_keeps_the_line() -> None:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", "/api/properties?token=rqc_leak", "1.1", 401), None)

    assert RedactQuerySecrets().filter(record)
    assert "rqc_leak" not in record.getMessage()
    assert record.getMessage() == '127.0.0.1:5000 - "GET /api/properties?token=[redacted] HTTP/1.1" 401'
