"""Wall-clock time for file timestamps, from one injectable place.

Timeouts, heartbeats and backoff use trio's clock instead, so that tests can
run them on ``trio.testing.MockClock``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

WallClock = Callable[[], int]


def system_time_ns() -> int:
    return time.time_ns()
