"""A truncate by path racing the release of the file's last handle (the kernel sends RELEASE
after close(2) has returned, so the two overlap whenever a program closes a file and then
truncates it by name; on a cluster the primary runs both as forwarded operations).

The release closed the file's descriptor while the truncate was cutting it in a worker thread:
``truncate`` then failed with EBADF (found by the cluster model test on n2), and with the
descriptor number reused by another open it could have cut another file.
"""

from __future__ import annotations

import threading

import pytest
import trio

from dfs.data.store import DataStore
from dfs.fs.ctx import SetAttrs
from tests.core.harness import Core
from tests.core.test_files import pattern


def test_release_during_truncate_keeps_the_descriptor(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern(131072)
    fh, a = core.create("/c")
    core.write(fh, 0, data)
    core.fsync(fh)  # settled: the release has nothing to settle and does not wait for the lock

    in_thread = threading.Event()
    go_on = threading.Event()
    real_truncate = DataStore.truncate

    def gated(fd: int, size: int) -> None:
        in_thread.set()
        assert go_on.wait(10), "the test never let the truncate go on"
        real_truncate(fd, size)

    monkeypatch.setattr(DataStore, "truncate", staticmethod(gated))

    async def race() -> None:
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def truncate() -> None:
                await core.vfs.setattr(a.ino, SetAttrs(size=15166), core.ctx)
                done.set()

            nursery.start_soon(truncate)
            await trio.to_thread.run_sync(in_thread.wait)
            await core.vfs.files.release(fh)  # the kernel's RELEASE, while the cut runs
            go_on.set()
            await done.wait()

    trio.run(race)
    assert core.vfs.getattr(a.ino).size == 15166
    assert core.read_file("/c") == data[:15166]
