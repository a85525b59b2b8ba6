"""The one boundary between the core and pyfuse3: attribute conversion and errno mapping.

Every handler is wrapped by ``fuse_errors``: an ``FsError`` becomes a
``FUSEError`` with its errno; anything else is a bug, logged with its
traceback, counted, and answered with EIO (tests fail on such a log line).
With metrics on (the handlers' object has ``fuse_metrics``: dfs/metrics.py),
it also times every request and counts its errors, by operation.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import pyfuse3

from dfs.errors import BUG_MARKER, FsError
from dfs.fs.ctx import Ctx
from dfs.metrics import FuseMetrics
from dfs.types import Attr

log = logging.getLogger("dfs.fuse")

P = ParamSpec("P")
R = TypeVar("R")


class Handlers(Protocol):
    """What ``fuse_errors`` needs of the object whose methods it wraps."""

    fuse_metrics: FuseMetrics | None


H = TypeVar("H", bound=Handlers)


class Counters:
    """Unexpected-exception count, shown in the daemon's exit log."""

    bugs = 0


def fuse_errors(
    fn: Callable[Concatenate[H, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[H, P], Coroutine[Any, Any, R]]:
    op = fn.__name__

    async def answer(self: H, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(self, *args, **kwargs)
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            Counters.bugs += 1
            log.exception("%s in %s; answering EIO", BUG_MARKER, op)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @functools.wraps(fn)
    async def wrapper(self: H, /, *args: P.args, **kwargs: P.kwargs) -> R:
        m = self.fuse_metrics
        if m is None:
            return await answer(self, *args, **kwargs)
        start = time.perf_counter()
        try:
            return await answer(self, *args, **kwargs)
        except pyfuse3.FUSEError as exc:
            m.failed(op, exc.errno)
            raise
        finally:
            m.observe(op, time.perf_counter() - start)

    return wrapper


def entry(a: Attr, timeout: float) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = pyfuse3.InodeT(a.ino)
    e.generation = a.generation
    e.entry_timeout = timeout
    e.attr_timeout = timeout
    e.st_mode = pyfuse3.ModeT(a.mode)
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = a.rdev
    e.st_size = a.size
    e.st_blksize = 65536
    e.st_blocks = a.blocks
    e.st_atime_ns = a.atime_ns
    e.st_mtime_ns = a.mtime_ns
    e.st_ctime_ns = a.ctime_ns
    e.st_birthtime_ns = a.btime_ns
    return e


def negative_entry(timeout: float) -> pyfuse3.EntryAttributes:
    """A cached "no such name" answer (st_ino 0)."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = pyfuse3.InodeT(0)
    e.entry_timeout = timeout
    return e


def ctx_of(ctx: pyfuse3.RequestContext) -> Ctx:
    pid = ctx.pid
    return Ctx(
        uid=ctx.uid,
        gid=ctx.gid,
        pid=pid,
        umask=ctx.umask,
        sup_groups=lambda: frozenset(pyfuse3.get_sup_groups(pid)),
    )
