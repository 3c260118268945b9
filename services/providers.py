"""The external providers an evaluation asks, one HTTP look-up per stage.

Each call has a timeout and a small, bounded number of tries with a short backoff between them
(a provider's hiccup should not cost a whole attempt); when they run out, the stage's failure
is an attempt's failure (ProviderUnavailable, retried by the engine with its own backoff, and
finished stages are not called again because their answers are checkpointed). An answer that
cannot change with a retry (the address is unknown) ends the evaluation at once.

`GET {base_url}/lookup/{stage}?address=…` answers `{"stage", "address", "answer": {...}}`; the
provider simulator (recalq's own, for the embedded default, the demo and the tests) speaks the
same, and production points `RECALQ_EVALUATION_PROVIDER_URL` at a gateway in front of the real
ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from services.errors import AddressNotFound, ProviderUnavailable

#: Statuses worth another try: the provider is busy or briefly broken.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass
class ProviderClient:
    base_url: str
    timeout_seconds: float = 10.0
    #: Tries per call, the first included.
    tries: int = 3
    backoff_seconds: float = 0.5
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    _http: httpx.Client | None = field(default=None, repr=False)

    def _client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(base_url=self.base_url.rstrip("/"),
                                      timeout=httpx.Timeout(self.timeout_seconds))
        return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def lookup(self, stage: str, address: str) -> dict[str, Any]:
        last = "no try made"
        for number in range(1, self.tries + 1):
            try:
                answer = self._client().get(f"/lookup/{stage}", params={"address": address})
            except httpx.TimeoutException:
                last = f"no answer within {self.timeout_seconds:g} s"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if answer.status_code == 200:
                    body = answer.json()
                    found = body.get("answer") if isinstance(body, dict) else None
                    if not isinstance(found, dict):
                        raise ProviderUnavailable(stage, "its answer had no 'answer' object")
                    return found
                if answer.status_code == 404 and stage == "locate_address":
                    raise AddressNotFound(f"the address provider does not know {address!r}")
                if answer.status_code not in RETRYABLE_STATUSES:
                    raise ProviderUnavailable(stage, f"it answered {answer.status_code}")
                last = f"it answered {answer.status_code}"
            if number < self.tries:
                self.sleep(self.backoff_seconds * 2 ** (number - 1))
        raise ProviderUnavailable(stage, f"{last} ({self.tries} tries)")
