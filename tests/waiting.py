"""Waiting on events in tests: one ``wait_until`` for the suite, ``await_until`` for trio.

A test that needs something to happen (a node to come back, a write to show on
another node, space to be freed) polls for that event itself, never sleeps a
guessed time. The deadline is generous on purpose: it is not a latency bound
(latency belongs in bench/) but a guard against a test that would hang forever;
on a loaded CI machine an event may take many times longer than usual and the
test must still pass. On timeout the failure says what was awaited and the
last value observed, so a failure reads like an assertion, not like a hang.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")

# Long enough for anything a healthy cluster does on a loaded two-core machine.
DEADLINE = 60.0


class WaitTimeout(AssertionError):
    """The awaited event did not happen within the deadline."""


def _failure(what: str, limit: float, last: object, exc: BaseException | None) -> WaitTimeout:
    if exc is not None:
        seen = f"last raised {exc!r}"
    elif isinstance(last, str):
        seen = f"last observed:\n{last:.4000}"
    else:
        seen = f"last observed {last!r:.4000}"
    return WaitTimeout(f"not within {limit:g}s: {what}; {seen}")


def wait_until(
    what: str,
    probe: Callable[[], T],
    *,
    ok: Callable[[T], object] = bool,
    limit: float = DEADLINE,
    every: float = 0.01,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``probe()`` until ``ok(value)`` holds; return that value.

    ``what`` says what is awaited (it opens the failure message). Exceptions of
    the types in ``retry_on`` count as "not yet" (e.g. ``FileNotFoundError``
    while a file is still on its way); the last one is named on timeout.
    Polls back off from ``every`` to 0.05 s (or ``every`` if longer).
    """
    deadline = time.monotonic() + limit
    delay = every
    last: object = None
    while True:
        exc: BaseException | None = None
        try:
            value = probe()
        except retry_on as e:
            exc = e
        else:
            if ok(value):
                return value
            last = value
        if time.monotonic() > deadline:
            raise _failure(what, limit, last, exc) from exc
        time.sleep(delay)  # polling interval, not synchronisation
        delay = min(delay * 1.5, max(every, 0.05))


async def await_until(
    what: str,
    probe: Callable[[], T | Awaitable[T]],
    *,
    ok: Callable[[T], object] = bool,
    limit: float = DEADLINE,
    every: float = 0.01,
) -> T:
    """The trio flavour of ``wait_until``: polls on trio's clock (so a MockClock
    jumps ahead instead of waiting), with ``probe`` sync or async."""
    last: object = None
    with trio.move_on_after(limit):
        while True:
            value = probe()
            if isinstance(value, Awaitable):
                value = await value
            if ok(value):
                return value
            last = value
            await trio.sleep(every)
    raise _failure(what, limit, last, None)


# Linux's CLOCK_REALTIME_COARSE (time does not export it): the clock the kernel stamps file
# times with (one jiffy, up to 10 ms, per tick).
CLOCK_REALTIME_COARSE = 5


def next_file_time() -> None:
    """Wait until a file time stamped from now on is later than any stamped before the call.

    For tests that check a change moves mtime or ctime forward: a change made
    within the same tick of the kernel's coarse clock as the one before it gets
    an equal time. Every time stamped before this call, by the kernel's coarse
    clock or a finer one (the daemon's, on cluster nodes), is at most the fine
    clock's reading now; once the coarse clock is past it, so are both.
    """
    before = time.time_ns()
    wait_until(
        f"the kernel's coarse clock past {before}",
        lambda: time.clock_gettime_ns(CLOCK_REALTIME_COARSE),
        ok=lambda now: now > before,
        every=0.001,
    )
