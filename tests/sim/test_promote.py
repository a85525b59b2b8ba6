"""A planned switch-over of a volume's primary (``dfs volume promote``), on real ClusterService
nodes over the simulated network (trio's MockClock: the seconds below are simulated, and
exact for a given schedule).

While every node makes updates and writes through files it holds open, n1 hands the root
volume over to n3: no update fails, none waits a second, nothing acknowledged is lost, the
files opened before (on n1 itself, and on n2 and n3 through n1) go on being written through n3, and
all replicas end identical. A promotion that cannot be done is refused with the reason, and
the volume goes on as before. And a file held open on a site follows a primary elected after
the old one was killed: its next writes go to the new primary.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from dfs.errors import FsError
from dfs.fs.ctx import ROOT_CTX
from dfs.types import ROOT_INODE, ROOT_VOLUME, FileHandle
from tests.sim.cluster import SimNode
from tests.sim.test_failover import (
    _cluster,
    _in_sync,
    _primary,
    _run,
    _start_all,
    _until,
    replicated,
)

CHUNK = b"0123456789" * 40


async def _writer(
    node: SimNode, stop: trio.Event, acked: list[bytes], slowest: list[float]
) -> None:
    """mkdir one name after another until ``stop``; every one must work."""
    svc = node.service
    assert svc is not None
    i = 0
    while not stop.is_set():
        name = b"%s-%d" % (node.name.encode(), i)
        start = trio.current_time()
        await svc.fs.mkdir(ROOT_INODE, name, 0o755, ROOT_CTX)
        slowest.append(trio.current_time() - start)
        acked.append(name)
        i += 1
        await trio.sleep(0.02)


async def _appender(node: SimNode, fh: FileHandle, stop: trio.Event, sizes: list[int]) -> None:
    """Append CHUNK through an open handle, with a flush (close's acknowledgement) every
    third write, until ``stop``; every write and flush must work."""
    svc = node.service
    assert svc is not None
    n = 0
    while not stop.is_set():
        assert await svc.fs.write(fh, n * len(CHUNK), CHUNK) == len(CHUNK)
        n += 1
        if n % 3 == 0:
            await svc.fs.flush(fh)
        await trio.sleep(0.03)
    await svc.fs.flush(fh)
    await svc.fs.fsync(fh, False)
    await svc.fs.release(fh)
    sizes.append(n * len(CHUNK))


def test_a_promotion_under_load_holds_updates_briefly_and_loses_nothing(tmp_path: Path) -> None:
    _net, nodes = _cluster(tmp_path)
    acked: list[bytes] = []
    slowest: list[float] = []
    sizes: dict[str, list[int]] = {"n1": [], "n2": [], "n3": []}
    done: dict[str, object] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await _start_all(nodes, nursery)
            handles = {}
            # On the primary itself, on a site through it, and on the site promoted.
            for name in ("n1", "n2", "n3"):
                svc = nodes[name].service
                assert svc is not None
                fh, _a = await svc.fs.create(
                    ROOT_INODE, b"file-" + name.encode(), 0o644, os.O_RDWR, ROOT_CTX
                )
                handles[name] = fh
            stop = trio.Event()
            async with trio.open_nursery() as work:
                for n in nodes.values():
                    work.start_soon(_writer, n, stop, acked, slowest)
                for name, fh in handles.items():
                    work.start_soon(_appender, nodes[name], fh, stop, sizes[name])
                await trio.sleep(1.0)
                before = len(slowest)
                start = trio.current_time()
                done.update(await nodes["n2"].control("volume.promote", {"path": "/", "to": "n3"}))
                done["took"] = trio.current_time() - start
                await trio.sleep(1.0)
                assert len(slowest) > before + 20, "updates went on after the promotion"
                stop.set()
            assert _primary(nodes) == ("n3", 2)
            await _in_sync(nodes, "n3")
            for n in nodes.values():
                assert n.vfs is not None
                for name in acked:
                    assert n.vfs.peek(ROOT_INODE, name) is not None, (n.name, name)
                for name in ("n1", "n2", "n3"):
                    a = n.vfs.peek(ROOT_INODE, b"file-" + name.encode())
                    assert a is not None and a.size == sizes[name][0], (n.name, name, a)
            for n in nodes.values():
                n.crash()

    _run(main)
    assert done["primary"] == "n3" and done["was"] == "n1" and done["epoch"] == 2, done
    assert float(done["took"]) < 1.0, done  # type: ignore[arg-type]
    assert max(slowest) < 1.0, f"an update waited {max(slowest):.2f} s (simulated)"
    assert replicated(nodes["n1"]) == replicated(nodes["n2"]) == replicated(nodes["n3"])


@pytest.mark.parametrize(
    ("to", "why"),
    [("n4", "unknown node"), ("n3", "not in sync"), ("n1", "primary already")],
)
def test_a_promotion_that_cannot_be_done_is_refused_and_nothing_changes(
    tmp_path: Path, to: str, why: str
) -> None:
    net, nodes = _cluster(tmp_path)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await _start_all(nodes, nursery)
            if why == "not in sync":
                nodes["n3"].crash()
                svc1 = nodes["n1"].service
                assert svc1 is not None
                repl = svc1.roles.replicator(ROOT_VOLUME)
                assert repl is not None
                await svc1.fs.mkdir(ROOT_INODE, b"while-n3-is-down", 0o755, ROOT_CTX)
                await _until("n3 out of sync", lambda: not repl.links["n3"].in_sync)
            if why == "primary already":
                got = await nodes["n2"].control("volume.promote", {"path": "/", "to": to})
                assert got["primary"] == got["was"] == "n1", got
            else:
                with pytest.raises(RuntimeError, match=why):
                    await nodes["n2"].control("volume.promote", {"path": "/", "to": to})
            assert _primary({k: v for k, v in nodes.items() if v.up}) == ("n1", 1)
            svc2 = nodes["n2"].service
            assert svc2 is not None
            await svc2.fs.mkdir(ROOT_INODE, b"after", 0o755, ROOT_CTX)
            for n in nodes.values():
                n.crash()

    _run(main)
    del net


def test_files_held_open_follow_a_primary_elected_after_a_kill(tmp_path: Path) -> None:
    """Files held open on n2 and on n3 through n1: one of them becomes the primary (its
    handle's writes are made there from then on), the other's go to it."""
    _net, nodes = _cluster(tmp_path)
    failed: list[FsError] = []

    async def write_on(name: str) -> None:
        svc = nodes[name].service
        assert svc is not None
        fs = svc.fs
        fh, _a = await fs.create(ROOT_INODE, name.encode(), 0o644, os.O_RDWR, ROOT_CTX)
        await fs.write(fh, 0, CHUNK)
        await fs.fsync(fh, False)  # acknowledged: must survive
        await kill.wait()
        while True:  # until a new primary takes the writes (each one is tried once)
            try:
                await fs.write(fh, len(CHUNK), CHUNK)
                await fs.fsync(fh, False)
                break
            except FsError as exc:
                failed.append(exc)
                assert trio.current_time() < 60, exc
                await trio.sleep(0.5)
        for i in range(2, 5):  # and the handle goes on working
            await fs.write(fh, i * len(CHUNK), CHUNK)
        await fs.flush(fh)
        await fs.release(fh)

    kill = trio.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await _start_all(nodes, nursery)
            async with trio.open_nursery() as work:
                for name in ("n2", "n3"):
                    work.start_soon(write_on, name)
                await trio.sleep(1.0)
                nodes["n1"].crash()
                kill.set()
            got = _primary({k: v for k, v in nodes.items() if v.up})
            assert got is not None and got[0] in ("n2", "n3") and got[1] >= 2, got
            for name in ("n2", "n3"):
                vfs = nodes[name].vfs
                assert vfs is not None
                for f in (b"n2", b"n3"):
                    await _until(
                        f"{name} has the whole file {f!r}",
                        lambda vfs=vfs, f=f: (
                            (a := vfs.peek(ROOT_INODE, f)) is not None and a.size == 5 * len(CHUNK)
                        ),
                    )
            for n in nodes.values():
                n.crash()

    _run(main)
    assert replicated(nodes["n2"]) == replicated(nodes["n3"])
