"""dfs-mountd with a count and a total time per FUSE request type (bench/run.py --count-requests).

Wraps every handler of ``DfsOperations`` before starting the ordinary daemon.
setattr is split by the fields it changes and getxattr by attribute name,
because the kernel sends many of both on its own (time flushes,
security.capability checks). On SIGUSR1 the cumulative totals are written
as JSON to $DFS_BENCH_COUNTS (replaced atomically), with a sequence number
so that the reader knows it sees a fresh snapshot. Wrapping costs about a
microsecond per request; figures of such a run are a little slower.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mountd.fuse_ops as fuse_ops  # noqa: E402
from mountd.cli import main  # noqa: E402

SETATTR_FIELDS = ("mode", "uid", "gid", "size", "atime", "mtime", "ctime")
totals: dict[str, list[int]] = {}  # request type -> [count, nanoseconds in the handler]
dumps = 0


def _kind(name: str, args: tuple[Any, ...]) -> str:
    """The request type; ``args`` as the handler got them (self first)."""
    if name == "setattr":
        fields = [f for f in SETATTR_FIELDS if getattr(args[3], "update_" + f)]
        return f"setattr({','.join(fields)})"
    if name == "getxattr":
        return f"getxattr({bytes(args[2]).decode(errors='replace')})"
    return name


def _counted(name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handler(*args: Any) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return await fn(*args)
        finally:
            t = totals.setdefault(_kind(name, args), [0, 0])
            t[0] += 1
            t[1] += time.perf_counter_ns() - t0

    handler.__name__ = name
    return handler


def _dump(signum: int, frame: FrameType | None) -> None:
    global dumps
    dumps += 1
    out = Path(os.environ["DFS_BENCH_COUNTS"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"seq": dumps, "totals": totals}))
    os.replace(tmp, out)


for _name, _fn in list(vars(fuse_ops.DfsOperations).items()):
    if inspect.iscoroutinefunction(_fn):
        setattr(fuse_ops.DfsOperations, _name, _counted(_name, _fn))
signal.signal(signal.SIGUSR1, _dump)

if __name__ == "__main__":
    main()
