"""The injectable clocks (DESIGN 6): timers take `now=` or `clock=`, so tests advance time
instead of sleeping.

`Clock` is wall time, timezone-aware UTC, as the ledger stores it (completion, retries,
leases, the dashboard's ages); `Monotonic` is seconds that never jump, for deadlines and
rate limits within one process (the connection guard, throttles, sessions, live config).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

Clock = Callable[[], dt.datetime]
Monotonic = Callable[[], float]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
