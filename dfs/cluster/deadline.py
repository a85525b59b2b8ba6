"""One deadline per client call: whatever a node waits for on behalf of one call ends by it.

A call the FUSE layer makes into ``NodeFs`` may wait for several things in turn: this node's
posted writes to be answered (``WriteBehind.drain``), its held writes to be written first, the
primary's answer to a forwarded update (``Forwarder.call``), this node's replica to apply it,
remote reads, and on the primary the sites' acknowledgements. Each of those has a limit of
its own (``timeouts.call``), but one after the other they would add up; so ``NodeFs`` opens one
deadline per call (``call_deadline``, ``timeouts.call`` from its start) and each wait ends by
``until(...)`` — its own limit or the call's deadline, whichever comes first. A call made while
another is being served by the same task (a flush inside a release, held writes written
before an update) keeps the outer deadline.

The deadline belongs to the task that opened it: a task started from inside a call (trio
copies the context into it) has none of its own, so it never inherits a deadline that is not
its own to keep.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import trio

_CALL: ContextVar[tuple[object, float] | None] = ContextVar("dfs_call_deadline", default=None)


def _current() -> float:
    got = _CALL.get()
    if got is None or got[0] is not trio.lowlevel.current_task():
        return math.inf
    return got[1]


@contextmanager
def call_deadline(limit: float) -> Iterator[float]:
    """Serve one client call: its deadline is ``limit`` seconds from now (or the deadline of
    the call this task is already serving). Yields the deadline."""
    outer = _current()
    if outer != math.inf:
        yield outer
        return
    end = trio.current_time() + limit
    token = _CALL.set((trio.lowlevel.current_task(), end))
    try:
        yield end
    finally:
        _CALL.reset(token)


@contextmanager
def fresh_deadline(limit: float) -> Iterator[float]:
    """A deadline of its own for a step that must be tried even when the call's deadline has
    passed (closing a handle on the primary at release: else it stays open there)."""
    end = trio.current_time() + limit
    token = _CALL.set((trio.lowlevel.current_task(), end))
    try:
        yield end
    finally:
        _CALL.reset(token)


def until(limit: float) -> float:
    """When a wait of at most ``limit`` seconds from now must end: then, or at the deadline
    of the call being served if that comes first."""
    return min(trio.current_time() + limit, _current())


def left(limit: float) -> float:
    """Seconds a wait of at most ``limit`` may take now (0 once the call's deadline passed)."""
    return max(0.0, until(limit) - trio.current_time())
