"""Retry delays: capped exponential backoff with bounded jitter, as a pure function.

After failed attempt n (1-based) the nominal delay is base * 2**(n-1), capped at max. Jitter
spreads it uniformly over [nominal * (1 - jitter), nominal * (1 + jitter)], again capped, so a
delay is never zero (unlike Celery's full jitter) and never above the cap.

With recalq's defaults (base 10 s, cap 600 s, jitter 0.2, 5 attempts) a failing job runs at
about t = 0, 10, 30, 70 and 150 s (each gap +-20 %) and is DEAD after the fifth failure:

>>> policy = RetryPolicy(base_seconds=10, max_seconds=600, jitter=0.2)
>>> [policy.nominal_delay(n) for n in range(1, 5)]
[10.0, 20.0, 40.0, 80.0]
>>> policy.delay(3, rand=lambda: 0.0), policy.delay(3, rand=lambda: 1.0)
(32.0, 48.0)
>>> RetryPolicy(base_seconds=10, max_seconds=600, jitter=0.2).nominal_delay(12)
600.0
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_seconds: float
    max_seconds: float
    jitter: float = 0.2

    def __post_init__(self) -> None:
        # Written so that NaN fails too: a NaN or infinite delay would reach Celery as a countdown.
        if not (0 < self.base_seconds < math.inf and 0 < self.max_seconds < math.inf):
            raise ValueError("base_seconds and max_seconds must be positive and finite")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def nominal_delay(self, failed_attempt: int) -> float:
        if failed_attempt < 1:
            raise ValueError("failed_attempt counts from 1")
        exponent = min(failed_attempt - 1, 62)  # 2**62 s is past any cap
        return float(min(self.max_seconds, self.base_seconds * 2**exponent))

    def delay(self, failed_attempt: int, rand: Callable[[], float] = random.random) -> float:
        nominal = self.nominal_delay(failed_attempt)
        spread = nominal * self.jitter
        low, high = self.bounds(failed_attempt)
        # Clamped so float rounding can never put a delay a hair outside bounds().
        return min(high, max(low, nominal - spread + 2 * spread * rand()))

    def bounds(self, failed_attempt: int) -> tuple[float, float]:
        nominal = self.nominal_delay(failed_attempt)
        return nominal * (1 - self.jitter), min(self.max_seconds, nominal * (1 + self.jitter))
