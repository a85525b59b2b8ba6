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
import trio.testing

from dfs.data.store import DataStore
from dfs.errors import NoSpace
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


@pytest.mark.parametrize("op", ["fsync", "write", "read"])
def test_release_during_an_operation_of_the_same_handle(
    core: Core, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    """The primary closes the handles of a peer that restarted (OpServer.release_node) while
    an operation of that handle may still run in a worker thread: the descriptor stays open
    until the operation is done."""
    big = pattern(1 << 20)  # large enough to go through a worker thread
    fh, a = core.create("/f")
    core.write(fh, 0, big)
    core.fsync(fh)

    in_thread = threading.Event()
    go_on = threading.Event()
    name = {"fsync": "fsync", "write": "pwrite", "read": "pread"}[op]
    real = getattr(DataStore, name)

    def gated(*args: object) -> object:
        in_thread.set()
        assert go_on.wait(10), "the test never let the operation go on"
        return real(*args)

    monkeypatch.setattr(DataStore, name, staticmethod(gated))
    got: list[object] = []

    async def race() -> None:
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def operate() -> None:
                files = core.vfs.files
                if op == "fsync":
                    got.append(await files.fsync(fh, False))
                elif op == "write":
                    got.append(await files.write(fh, 0, b"w" * len(big)))
                else:
                    got.append(await files.read(fh, 0, len(big)))
                done.set()

            nursery.start_soon(operate)
            await trio.to_thread.run_sync(in_thread.wait)
            # The release runs while the operation is in its thread (a write holds the
            # file's lock, so its release waits for it; the others do not wait).
            nursery.start_soon(core.vfs.files.release, fh)
            await trio.testing.wait_all_tasks_blocked()
            go_on.set()
            await done.wait()

    trio.run(race)
    monkeypatch.undo()
    if op == "read":
        assert got == [big]
    want = b"w" * len(big) if op == "write" else big
    assert core.read_file("/f") == want
    assert core.vfs.getattr(a.ino).size == len(big)


def test_a_refused_write_leaves_the_file_closable(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write refused for space (ENOSPC before anything changes) must not keep the file open:
    once its handle is released, an unlinked file's space is freed."""
    fh, a = core.create("/f")

    def full(nbytes: int) -> None:
        raise NoSpace()

    monkeypatch.setattr(core.vfs.data, "admit", full)
    with pytest.raises(NoSpace):
        core.write(fh, 0, b"x" * 100)
    monkeypatch.undo()
    core.unlink("/f")
    core.release(fh)
    assert not core.vfs.files.is_open(a.ino)
