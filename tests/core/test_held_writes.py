"""Small writes a cluster node holds and writes as one (NodeFs.write, ``_after_held_writes``).

One primary and one site in one process (as tests/core/test_write_ack.py).
Checked: writes that continue each other become one update (one journal
record, one replicated record) when the handle is flushed; a write that does
not continue them, and every other operation of the node, writes them first,
so getattr and read on the node see them; they carry the time of the last
write, not of the flush; an error writing them on behalf of another operation
is reported by the handle's next write (or flush), once; release writes them
too. Each check fails with holding switched off or with the hooks removed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from dfs.cluster.nodefs import NodeFs
from dfs.cluster.remote import LocalReader
from dfs.cluster.replication import ReplicaApplier, Replicator
from dfs.cluster.roles import VolumeRoles
from dfs.cluster.writebehind import GATHER_MAX, HOLD_FOR
from dfs.errors import FsError
from dfs.fs.ctx import ROOT_CTX
from dfs.types import ROOT_INODE, ROOT_VOLUME, NodeId
from tests.core.test_replication import Node, replicating_to
from tests.waiting import await_until

T0 = 1_800_000_000_000_000_000


def _pair(tmp_path: Path) -> tuple[Node, Node, NodeFs, Replicator]:
    primary = Node(tmp_path / "n1", 1)
    site = Node(tmp_path / "n2", 2, replica=True)
    repl, _gate = replicating_to(primary, ReplicaApplier(site.meta, site.data, NodeId(2)))
    now = [T0]
    primary.vfs.clock = primary.vfs.files.clock = lambda: now[0]
    fs = NodeFs(primary.vfs, VolumeRoles.alone(primary.meta, repl))
    fs.test_clock = now  # type: ignore[attr-defined]
    return primary, site, fs, repl


def _run(
    fs: NodeFs,
    repl: Replicator,
    body: Callable[[], Awaitable[None]],
    *,
    quiet_writers: bool = False,
) -> None:
    """Run ``body`` once the primary streams to the site (and, with ``quiet_writers``, the
    task that writes what is held for too long, as in mountd)."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(repl.run)
            if quiet_writers:
                nursery.start_soon(fs.writes.run)
            await await_until("n2 in sync", lambda: repl.links["n2"].in_sync)
            await body()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.02))


def test_writes_that_continue_each_other_become_one_update(tmp_path: Path) -> None:
    primary, site, fs, repl = _pair(tmp_path)
    now: list[int] = fs.test_clock  # type: ignore[attr-defined]

    async def body() -> None:
        fh, f = await fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT_CTX)
        seq = primary.meta.seq(ROOT_VOLUME)
        chunks = [bytes([65 + i]) * 10240 for i in range(6)]  # tar's 10 KiB writes
        for i, c in enumerate(chunks):
            now[0] = T0 + i
            assert await fs.write(fh, i * 10240, c) == 10240
        assert primary.meta.seq(ROOT_VOLUME) == seq  # held, nothing written yet
        now[0] = T0 + 1000
        await fs.flush(fh)
        assert primary.meta.seq(ROOT_VOLUME) == seq + 1  # one update for six writes
        want = b"".join(chunks)
        for n in (primary, site):  # on the site once close returned
            assert await LocalReader(n.vfs).read(f.ino, 0, 1 << 20) == want
        a = site.vfs.getattr(f.ino)
        assert (a.size, a.mtime_ns) == (len(want), T0 + 5)  # the last write's time

        # A write that does not continue the held ones writes them first.
        await fs.write(fh, 0, b"x" * 100)
        await fs.write(fh, 200, b"y" * 100)
        assert primary.meta.seq(ROOT_VOLUME) == seq + 2
        # Any other operation of the node writes them before it runs: getattr and
        # read see them, like after a plain write.
        await fs.write(fh, len(want), b"z" * 5)  # writes the "y"s
        assert primary.meta.seq(ROOT_VOLUME) == seq + 3
        assert (await fs.getattr(f.ino)).size == len(want) + 5
        assert primary.meta.seq(ROOT_VOLUME) == seq + 4
        await fs.write(fh, 300, b"w" * 7)
        got = await fs.read(fh, 0, 1 << 20)
        assert got[:100] == b"x" * 100 and got[200:300] == b"y" * 100
        assert got[300:307] == b"w" * 7 and got[-5:] == b"z" * 5
        # A write of GATHER_MAX bytes or more is not held.
        await fs.write(fh, 0, b"b" * GATHER_MAX)
        assert primary.meta.seq(ROOT_VOLUME) > seq + 5
        # Release writes what is held (a close without flush: written through a
        # mapping, or a dup'ed descriptor closed last).
        await fs.write(fh, 10, b"r" * 3)
        await fs.release(fh)
        assert (await LocalReader(primary.vfs).read(f.ino, 10, 3)) == b"rrr"
        await await_until(
            "the site at the primary's seq (site, primary)",
            lambda: (site.meta.seq(ROOT_VOLUME), primary.meta.seq(ROOT_VOLUME)),
            ok=lambda s: s[0] == s[1],
        )
        assert (await LocalReader(site.vfs).read(f.ino, 10, 3)) == b"rrr"

    _run(fs, repl, body)


def test_an_error_of_held_writes_is_reported_by_the_handle_once(tmp_path: Path) -> None:
    primary, site, fs, repl = _pair(tmp_path)

    bad = 12345  # a write at this offset finds the disk full
    write = fs.files.write

    async def full_at_bad(fh: int, off: int, data: bytes, when: int | None = None) -> int:
        if off == bad:
            raise FsError(errno.ENOSPC, "no space left")
        return await write(fh, off, data, when)

    fs.files.write = full_at_bad  # type: ignore[method-assign]

    async def body() -> None:
        fh, f = await fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT_CTX)
        other, g = await fs.create(ROOT_INODE, b"g", 0o644, os.O_RDWR, ROOT_CTX)
        # Held, so write(2) succeeds ...
        assert await fs.write(fh, bad, b"x") == 1
        # ... and another operation writes it: that operation is not failed ...
        await fs.write(other, 0, b"fine")
        assert (await fs.getattr(g.ino)).size == 4
        # ... the handle's next write reports it, once.
        with pytest.raises(FsError) as exc:
            await fs.write(fh, 0, b"a")
        assert exc.value.errno == errno.ENOSPC
        await fs.write(fh, 0, b"a")
        await fs.flush(fh)
        # Reported by flush (close) when no write comes first.
        await fs.write(fh, bad, b"x")
        with pytest.raises(FsError) as exc:
            await fs.flush(fh)
        assert exc.value.errno == errno.ENOSPC
        await fs.flush(fh)
        await fs.release(fh)
        await fs.release(other)
        assert await LocalReader(site.vfs).read(f.ino, 0, 10) == b"a"

    _run(fs, repl, body)


def test_a_site_reads_a_file_whose_digests_have_not_followed_yet(tmp_path: Path) -> None:
    """Between a write and the settle record (the primary stores digests at fsync and
    release), a site's blocks are newer than its digests: it must not call them corrupt.
    (The ``dirty`` record's value is empty: a truthiness check missed it.)"""
    primary, site, fs, repl = _pair(tmp_path)

    async def body() -> None:
        fh, f = await fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT_CTX)
        await fs.write(fh, 0, b"a" * GATHER_MAX)  # a data file (past the inline size)
        await fs.flush(fh)
        await fs.fsync(fh, False)  # settled: block 0's digest is stored everywhere
        await fs.write(fh, 10, b"b" * 10)  # part of block 0: its digest is now stale
        await fs.flush(fh)  # on the site, not settled (the handle is still open)
        want = b"a" * 10 + b"b" * 10 + b"a" * (GATHER_MAX - 20)
        assert await LocalReader(site.vfs).read(f.ino, 0, GATHER_MAX) == want
        await fs.release(fh)
        await await_until(
            "the site at the primary's seq (site, primary)",
            lambda: (site.meta.seq(ROOT_VOLUME), primary.meta.seq(ROOT_VOLUME)),
            ok=lambda s: s[0] == s[1],
        )
        assert await LocalReader(site.vfs).read(f.ino, 0, GATHER_MAX) == want

    _run(fs, repl, body)


def test_a_writer_that_goes_quiet_is_written_soon(tmp_path: Path) -> None:
    """A log appended without fsync or close still reaches the sites (write_held_writes)."""
    primary, site, fs, repl = _pair(tmp_path)

    async def body() -> None:
        fh, f = await fs.create(ROOT_INODE, b"log", 0o644, os.O_RDWR, ROOT_CTX)
        for i in range(3):
            seq = primary.meta.seq(ROOT_VOLUME)
            await fs.write(fh, i * 6, b"line%d\n" % i)
            await trio.sleep(HOLD_FOR / 2)
            assert primary.meta.seq(ROOT_VOLUME) == seq  # still held
            await trio.sleep(HOLD_FOR)
            assert primary.meta.seq(ROOT_VOLUME) == seq + 1
            await await_until(
                "the site at the primary's seq (site, primary)",
                lambda: (site.meta.seq(ROOT_VOLUME), primary.meta.seq(ROOT_VOLUME)),
                ok=lambda s: s[0] == s[1],
            )
            got = await LocalReader(site.vfs).read(f.ino, 0, 100)
            assert got == b"".join(b"line%d\n" % j for j in range(i + 1))
        await fs.release(fh)

    _run(fs, repl, body, quiet_writers=True)


def test_writes_of_two_handles_of_one_file_keep_their_order(tmp_path: Path) -> None:
    """Held per handle, writes of two handles to one file could be written out of the
    order they were made; one holder per file keeps it (the later write wins, as POSIX)."""
    primary, site, fs, repl = _pair(tmp_path)

    async def body() -> None:
        one, f = await fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT_CTX)
        two = await fs.open(f.ino, os.O_RDWR, ROOT_CTX)
        await fs.write(one, 0, b"a" * 100)
        await fs.write(two, 100, b"b" * 100)  # writes one's first
        await fs.write(one, 100, b"c" * 100)  # later than two's: must win
        await fs.write(two, 200, b"d" * 50)
        await fs.flush(one)
        await fs.flush(two)
        want = b"a" * 100 + b"c" * 100 + b"d" * 50
        for n in (primary, site):
            assert await LocalReader(n.vfs).read(f.ino, 0, 1000) == want
        assert await fs.read(one, 0, 1000) == want
        await fs.release(one)
        await fs.release(two)

    _run(fs, repl, body)
