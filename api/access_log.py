"""Keeps secrets sent in a query string out of the access log.

Credentials belong in headers, and the API refuses them anywhere else; but a refused request is
still logged, and an access log line with `?token=rqc_...` in it is a leaked credential. Values
of parameters whose names suggest a secret are written as `[redacted]`; the rest of the path
stays as sent, so the line is still useful.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, urlencode

#: Parameter names (case-insensitive, `-` and `_` alike) whose values are never logged.
SECRET_NAMES = re.compile(r"^(?:.*token|.*key|.*secret|password|passwd|pwd|sig|signature|session|auth.*|credential.*)$",
                          re.IGNORECASE)
REDACTED = "[redacted]"


def redact_path(path: str) -> str:
    base, sep, query = path.partition("?")
    if not sep:
        return path
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(SECRET_NAMES.match(name.replace("-", "_")) for name, _ in pairs):
        return path
    safe = [(name, REDACTED if SECRET_NAMES.match(name.replace("-", "_")) else value) for name, value in pairs]
    return f"{base}?{urlencode(safe, safe='[]')}"


class RedactQuerySecrets(logging.Filter):
    """uvicorn's access record: args = (client, method, path with query, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_path(args[2]), *args[3:])
        return True


def install() -> None:
    """Once per process (create_app may run more than once in one, as tests do)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQuerySecrets) for f in access.filters):
        access.addFilter(RedactQuerySecrets())
