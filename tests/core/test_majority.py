"""Majority acknowledgement without FUSE: a primary and two sites in one process, on MockClock.

An update is acknowledged once a majority of the volume's sites (the primary counts) and every
site in sync applied it. Without a majority it fails: ``ETIMEDOUT`` when it was made here but
not acknowledged within ``timeouts.call`` (its outcome is unknown), then ``EROFS`` at once,
before anything is made, while fewer than a majority of the sites stay in sync.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import trio

from dfs.cluster.nodefs import NodeFs
from dfs.cluster.replication import Replicator
from dfs.cluster.roles import VolumeRoles
from dfs.errors import FsError
from dfs.fs.ctx import ROOT_CTX
from dfs.net.rpc import PeerUnavailable
from dfs.types import ROOT_INODE, ROOT_VOLUME
from tests.core.test_replication import LEASE, mock_clock, three_nodes
from tests.waiting import await_until

CALL = 5.0


def _cluster(tmp_path: Path, names: list[str]) -> tuple[Any, ...]:
    primary, sites, appliers = three_nodes(tmp_path)
    sites = {n: sites[n] for n in names}
    down: set[str] = set()
    stuck: set[str] = set()

    async def call(site: str, method: str, args: dict[str, Any], limit: float) -> Any:
        await trio.sleep(0.001)
        if site in down:
            raise PeerUnavailable(f"{site} is down")
        if site in stuck and args["records"]:
            await trio.sleep(limit)  # no answer within the deadline
            raise PeerUnavailable(f"{site}: no answer")
        return {"have": await appliers[site].apply(args["vol"], args["records"])}

    repl = Replicator(
        primary.meta, primary.data, ROOT_VOLUME, names, call, call_timeout=CALL, lease=LEASE
    )
    fs = NodeFs(primary.vfs, VolumeRoles.alone(primary.meta, repl))
    return primary, sites, repl, fs, down, stuck


def test_three_sites_go_on_with_two_and_refuse_updates_with_one(tmp_path: Path) -> None:
    primary, sites, repl, fs, down, _stuck = _cluster(tmp_path, ["n2", "n3"])
    assert repl.majority == 2

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(repl.run)
            await await_until("both in sync", lambda: repl.in_sync_sites() == 3)
            await fs.mkdir(ROOT_INODE, b"a", 0o755, ROOT_CTX)
            # One site down: a majority (the primary and n2) remains; after n3's lease ran
            # out, updates are acknowledged without it.
            down.add("n3")
            repl.kick("n3")
            await fs.mkdir(ROOT_INODE, b"b", 0o755, ROOT_CTX)
            await await_until("n3 out of sync", lambda: not repl.links["n3"].in_sync)
            assert sites["n2"].vfs.peek(ROOT_INODE, b"b") is not None
            # Both down: the next update is made here but cannot be acknowledged.
            down.add("n2")
            start = trio.current_time()
            with pytest.raises(FsError) as e:
                await fs.mkdir(ROOT_INODE, b"c", 0o755, ROOT_CTX)
            assert e.value.errno == errno.ETIMEDOUT, e.value
            assert trio.current_time() - start <= CALL + LEASE + 0.5
            assert primary.vfs.peek(ROOT_INODE, b"c") is not None  # outcome unknown
            await await_until("n2 out of sync", lambda: not repl.links["n2"].in_sync)
            await trio.sleep(CALL)
            # Without a majority for call_timeout: refused at once, before anything is made.
            seq = primary.meta.seq(ROOT_VOLUME)
            start = trio.current_time()
            with pytest.raises(FsError) as e:
                await fs.mkdir(ROOT_INODE, b"d", 0o755, ROOT_CTX)
            assert e.value.errno == errno.EROFS, e.value
            assert "1 of its 3 sites" in str(e.value) and "needs 2" in str(e.value)
            assert trio.current_time() - start < 0.1
            assert primary.meta.seq(ROOT_VOLUME) == seq
            assert primary.vfs.peek(ROOT_INODE, b"d") is None
            # Reads go on.
            assert primary.vfs.peek(ROOT_INODE, b"a") is not None
            # n3 comes back: it catches up (with "c" too) and updates work again.
            down.discard("n3")
            repl.kick("n3")
            await await_until("n3 in sync", lambda: repl.links["n3"].in_sync)
            await fs.mkdir(ROOT_INODE, b"e", 0o755, ROOT_CTX)
            for name in ("c", "e"):
                assert sites["n3"].vfs.peek(ROOT_INODE, name.encode()) is not None
            nursery.cancel_scope.cancel()

    trio.run(main, clock=mock_clock())


def test_two_sites_need_both(tmp_path: Path) -> None:
    primary, sites, repl, fs, down, _stuck = _cluster(tmp_path, ["n2"])
    assert repl.majority == 2

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(repl.run)
            await await_until("n2 in sync", lambda: repl.in_sync_sites() == 2)
            await fs.mkdir(ROOT_INODE, b"a", 0o755, ROOT_CTX)
            down.add("n2")
            with pytest.raises(FsError) as e:
                await fs.mkdir(ROOT_INODE, b"b", 0o755, ROOT_CTX)
            assert e.value.errno == errno.ETIMEDOUT
            await trio.sleep(CALL)
            with pytest.raises(FsError) as e:
                await fs.mkdir(ROOT_INODE, b"c", 0o755, ROOT_CTX)
            assert e.value.errno == errno.EROFS
            nursery.cancel_scope.cancel()

    trio.run(main, clock=mock_clock())


def test_a_site_in_sync_that_stops_answering_delays_an_update_by_a_bounded_time(
    tmp_path: Path,
) -> None:
    _primary, sites, repl, fs, _down, stuck = _cluster(tmp_path, ["n2", "n3"])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(repl.run)
            await await_until("both in sync", lambda: repl.in_sync_sites() == 3)
            assert repl.grant("n3")
            stuck.add("n3")
            start = trio.current_time()
            await fs.mkdir(ROOT_INODE, b"a", 0o755, ROOT_CTX)
            took = trio.current_time() - start
            # n3 is dropped once its request is late, then its lease must run out.
            assert CALL - 0.5 <= took <= CALL + LEASE + 0.5, took
            assert not repl.links["n3"].in_sync
            assert sites["n2"].vfs.peek(ROOT_INODE, b"a") is not None
            nursery.cancel_scope.cancel()

    trio.run(main, clock=mock_clock())


def test_a_primary_whose_sites_never_came_refuses_updates_after_the_call_timeout(
    tmp_path: Path,
) -> None:
    primary, _sites, repl, fs, down, _stuck = _cluster(tmp_path, ["n2", "n3"])
    down.update({"n2", "n3"})

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(repl.run)
            await trio.sleep(CALL + 0.1)
            with pytest.raises(FsError) as e:
                await fs.mkdir(ROOT_INODE, b"a", 0o755, ROOT_CTX)
            assert e.value.errno == errno.EROFS
            assert "1 of its 3 sites" in str(e.value)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=mock_clock())
    assert primary.vfs.peek(ROOT_INODE, b"a") is None
