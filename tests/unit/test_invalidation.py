"""Kernel cache invalidations that race with the kernel making what they invalidate.

This node answers a lookup (an inode, or "no such name"); the kernel makes the
inode or the negative entry from the answer only when the task that asked runs
again. An invalidation of a change committed in between finds nothing
(ENOENT). mountd.daemon.invalidate_one tries again while the kernel may be
making it (``in_flight``), for a bounded time; DfsOperations.in_flight says
when that can be the case. (Seen through mounts as a file created and written
on another node that kept showing 0 bytes: bench/cluster.py's visibility test,
about 1 sample in 200 before this.)
"""

from __future__ import annotations

import errno
from types import SimpleNamespace
from typing import Any

import pytest

from dfs.cluster.applier import Inval
from mountd import fuse_ops
from mountd.daemon import INFLIGHT_RETRY, invalidate_one
from mountd.fuse_ops import DfsOperations


def enoent_times(n: int) -> tuple[list[Inval], Any]:
    calls: list[Inval] = []

    def notify(item: Inval) -> None:
        calls.append(item)
        if len(calls) <= n:
            raise OSError(errno.ENOENT, "not in the kernel's cache")

    return calls, notify


def test_an_invalidation_of_something_in_flight_is_tried_until_it_lands() -> None:
    calls, notify = enoent_times(3)
    invalidate_one(("i", 5), lambda item: True, notify, sleep=lambda s: None)
    assert calls == [("i", 5)] * 4


def test_an_invalidation_of_something_not_in_flight_is_tried_once() -> None:
    calls, notify = enoent_times(3)
    invalidate_one(("e", 1, b"x"), lambda item: False, notify, sleep=lambda s: None)
    assert calls == [("e", 1, b"x")]


def test_retries_are_bounded_and_other_errors_not_retried() -> None:
    calls, notify = enoent_times(10**9)
    now = [0.0]  # a fake clock that only the retries' sleeps advance
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    invalidate_one(
        ("d", 5), lambda item: True, notify, wait=0.05, sleep=sleep, clock=lambda: now[0]
    )
    # Tried until the wait ran out, one retry interval apart, then given up.
    assert set(slept) == {INFLIGHT_RETRY}
    assert 0.05 <= now[0] < 0.05 + 2 * INFLIGHT_RETRY
    assert len(calls) == len(slept) + 1

    def busy(item: Inval) -> None:
        calls.append(item)
        raise OSError(errno.EIO, "something else")

    calls.clear()
    invalidate_one(("i", 5), lambda item: True, busy, sleep=lambda s: None)
    assert len(calls) == 1


def fake_ops(lookups: dict[int, int]) -> DfsOperations:
    fs = SimpleNamespace(
        standalone=False,
        vfs=SimpleNamespace(lookups=lookups, writeback_cache=False),
    )
    return DfsOperations(fs)  # type: ignore[arg-type]


def test_in_flight_means_held_inodes_and_names_just_answered_negatively(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ops = fake_ops({7: 1})
    assert ops.in_flight(("i", 7)) and ops.in_flight(("d", 7))
    assert not ops.in_flight(("i", 8))
    assert not ops.in_flight(("e", 1, b"new"))
    ops._answered_negative(1, b"new")
    assert ops.in_flight(("e", 1, b"new"))
    assert not ops.in_flight(("e", 1, b"other")) and not ops.in_flight(("e", 2, b"new"))
    # Forgotten after NEGATIVE_MEMORY, and at most NEGATIVES_MAX are kept.
    monkeypatch.setattr(fuse_ops, "NEGATIVE_MEMORY", 0.0)
    assert not ops.in_flight(("e", 1, b"new"))
    monkeypatch.setattr(fuse_ops, "NEGATIVE_MEMORY", 60.0)
    monkeypatch.setattr(fuse_ops, "NEGATIVES_MAX", 3)
    for i in range(10):
        ops._answered_negative(1, b"n%d" % i)
    assert len(ops._negatives) == 3
    assert ops.in_flight(("e", 1, b"n9")) and not ops.in_flight(("e", 1, b"n0"))
