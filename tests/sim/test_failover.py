"""Failover of a volume's primary, on real ClusterService nodes over the simulated network.

Three nodes store the root volume (primary n1). Scenarios, on trio's MockClock (seconds below
are the simulated clock's, not wall-clock luck):

- n1 is killed: n2 and n3 elect one of them in epoch 2, updates made through any surviving node
  work again within 10 s of the kill, nothing acknowledged before is lost; n1 restarts as a
  site of epoch 2 and catches up.
- n1 is cut off from both sites while its client makes an update: that update is not
  acknowledged (ETIMEDOUT or EROFS); the majority side elects a new primary and goes on; when
  the partition heals, n1 learns the new epoch, steps down; the new primary finds n1's
  unacknowledged record (n1 has "diverged") and has n1 roll it back, keeping it aside; then
  n1's replica is the new primary's.
- a site cut off alone never disturbs the volume: it cannot win an election (its pre-votes are
  refused while the others hear the primary), the epoch stays 1.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio
import trio.testing

from dfs.cluster.rollback import list_rolled_back
from dfs.errors import FsError
from dfs.fs.ctx import ROOT_CTX
from dfs.types import ROOT_INODE, ROOT_VOLUME, VolumeId
from tests.sim.cluster import SimNode, default_timeouts, make_config
from tests.sim.net import Faults, SimNet
from tests.sim.schedule import _replicated, deterministic

T = TypeVar("T")
NAMES = ["n1", "n2", "n3"]


def _cluster(tmp_path: Path) -> tuple[SimNet, dict[str, SimNode]]:
    net = SimNet(random.Random(1), Faults(delay=0.002))
    config = make_config(NAMES, "n1", NAMES, default_timeouts())
    return net, {n: SimNode(net, config, n, tmp_path / n) for n in NAMES}


def replicated(node: SimNode) -> object:
    """The stopped node's replicated databases (what every replica must hold alike)."""
    return _replicated(node.dir)


def _run(main: Callable[[], Awaitable[None]]) -> None:
    with deterministic(1):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def _until(what: str, cond: Callable[[], bool], limit: float = 60.0) -> None:
    """Look every 0.1 s (simulated) until ``cond()``."""
    with trio.move_on_after(limit):
        while not cond():  # noqa: ASYNC110 - polling state, on the mock clock
            await trio.sleep(0.1)
        return
    raise AssertionError(f"not within {limit:g} s (simulated): {what}")


def _primary(nodes: dict[str, SimNode]) -> tuple[str, int] | None:
    """The one node that orders the root volume, and its epoch (None if none or two)."""
    found = [
        (n.name, n.service.roles.epoch(ROOT_VOLUME))
        for n in nodes.values()
        if n.service is not None and n.service.roles.orders(ROOT_VOLUME)
    ]
    return found[0] if len(found) == 1 else None


async def _start_all(nodes: dict[str, SimNode], nursery: trio.Nursery) -> None:
    """Start every node; return once every site is in sync with n1, the first primary."""
    for n in nodes.values():
        await n.start(nursery)
    await _in_sync(nodes, "n1")


async def _in_sync(nodes: dict[str, SimNode], primary: str) -> None:
    def ok() -> bool:
        svc = nodes[primary].service
        repl = svc.roles.replicator(ROOT_VOLUME) if svc is not None else None
        return repl is not None and all(lk.in_sync for lk in repl.links.values())

    await _until(f"every site in sync with {primary}", ok)


async def _retry(what: str, call: Callable[[], Awaitable[T]], limit: float) -> tuple[T, float]:
    """Try ``call`` every 0.2 s until it works; its result and when it first worked."""
    start = trio.current_time()
    while True:
        try:
            return await call(), trio.current_time() - start
        except FsError as exc:
            if trio.current_time() - start > limit:
                raise AssertionError(f"{what}: still failing after {limit:g} s: {exc}") from None
            await trio.sleep(0.2)


def test_a_killed_primary_is_replaced_within_10_s_and_nothing_acknowledged_is_lost(
    tmp_path: Path,
) -> None:
    net, nodes = _cluster(tmp_path)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await _start_all(nodes, nursery)
            acked = []
            for i, name in enumerate(["n1", "n2", "n3"] * 2):
                svc = nodes[name].service
                assert svc is not None
                await svc.fs.mkdir(ROOT_INODE, b"before%d" % i, 0o755, ROOT_CTX)
                acked.append(b"before%d" % i)
            nodes["n1"].crash()
            for name in ("n2", "n3"):
                svc = nodes[name].service
                assert svc is not None
                fs = svc.fs
                _attr, took = await _retry(
                    f"mkdir on {name}",
                    lambda fs=fs, name=name: fs.mkdir(
                        ROOT_INODE, b"after-" + name.encode(), 0o755, ROOT_CTX
                    ),
                    limit=30.0,
                )
                if name == "n2":
                    assert took < 10.0, f"updates came back {took:.1f} s after the kill"
                acked.append(b"after-" + name.encode())
            got = _primary(nodes)
            assert got is not None and got[0] in ("n2", "n3") and got[1] >= 2, got
            new, epoch = got
            # n1 comes back: a site of epoch 2, caught up, with every acknowledged update.
            await nodes["n1"].start(nursery)
            await _in_sync(nodes, new)
            assert _primary(nodes) == (new, epoch)
            for n in nodes.values():
                assert n.vfs is not None
                for name in acked:
                    assert n.vfs.peek(ROOT_INODE, name) is not None, (n.name, name)
                assert n.service is not None and n.service.roles.epoch(ROOT_VOLUME) == epoch
            svc = nodes["n1"].service
            assert svc is not None
            await svc.fs.mkdir(ROOT_INODE, b"from-n1-again", 0o755, ROOT_CTX)
            for n in nodes.values():
                n.crash()

    _run(main)


def test_an_old_primary_cut_off_loses_its_unacknowledged_update_to_the_majority(
    tmp_path: Path,
) -> None:
    net, nodes = _cluster(tmp_path)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await _start_all(nodes, nursery)
            svc1 = nodes["n1"].service
            assert svc1 is not None
            await svc1.fs.mkdir(ROOT_INODE, b"acked", 0o755, ROOT_CTX)
            net.partition([frozenset({"n1"}), frozenset({"n2", "n3"})])
            try:
                await svc1.fs.mkdir(ROOT_INODE, b"lost", 0o755, ROOT_CTX)
                raise AssertionError("an update without a majority was acknowledged")
            except FsError as exc:
                assert exc.errno in (errno.ETIMEDOUT, errno.EROFS), exc
            svc2 = nodes["n2"].service
            assert svc2 is not None
            fs2 = svc2.fs
            await _retry(
                "mkdir on n2",
                lambda: fs2.mkdir(ROOT_INODE, b"majority", 0o755, ROOT_CTX),
                limit=30.0,
            )
            # Two primaries may exist for a moment (n1 has not heard), in different epochs.
            assert svc1.roles.epoch(ROOT_VOLUME) == 1
            try:
                await svc1.fs.mkdir(ROOT_INODE, b"refused", 0o755, ROOT_CTX)
                raise AssertionError("the cut-off old primary acknowledged an update")
            except FsError as exc:
                assert exc.errno in (errno.ETIMEDOUT, errno.EROFS), exc
            # n1 still believes it orders the volume (it has heard nobody), in epoch 1.
            got = _primary({k: v for k, v in nodes.items() if k != "n1"})
            assert got is not None and got[1] >= 2, got
            net.heal()
            await _until(
                "n1 follows the new epoch",
                lambda: svc1.roles.epoch(ROOT_VOLUME) == got[1],
                limit=30.0,
            )
            assert not svc1.roles.orders(ROOT_VOLUME)
            assert _primary(nodes) == got
            new = nodes[got[0]].service
            assert new is not None
            repl = new.roles.replicator(ROOT_VOLUME)
            assert repl is not None
            # n1 rolls its unacknowledged update back (kept aside), catches up, is in sync.
            await _until("n1 rolled back", lambda: svc1.rollback.count == 1, limit=30.0)
            await _in_sync(nodes, got[0])
            kept = list_rolled_back(tmp_path / "n1")
            assert len(kept) == 1 and "+lost" in kept[0]["entries"], kept
            for name in NAMES:
                vfs = nodes[name].vfs
                assert vfs is not None
                assert vfs.peek(ROOT_INODE, b"acked") is not None
                assert vfs.peek(ROOT_INODE, b"majority") is not None
                assert vfs.peek(ROOT_INODE, b"lost") is None, name
            for n in nodes.values():
                n.crash()

    _run(main)
    assert replicated(nodes["n1"]) == replicated(nodes["n2"]) == replicated(nodes["n3"])


def test_a_site_cut_off_alone_does_not_disturb_the_volume(tmp_path: Path) -> None:
    net, nodes = _cluster(tmp_path)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await _start_all(nodes, nursery)
            net.partition([frozenset({"n1", "n2"}), frozenset({"n3"})])
            await trio.sleep(20)
            net.heal()
            await _in_sync(nodes, "n1")
            assert _primary(nodes) == ("n1", 1)
            svc3 = nodes["n3"].service
            assert svc3 is not None
            await svc3.fs.mkdir(ROOT_INODE, b"x", 0o755, ROOT_CTX)
            assert svc3.roles.epoch(ROOT_VOLUME) == 1
            for n in nodes.values():
                n.crash()

    _run(main)


def test_a_volume_created_with_its_own_failover_after_waits_that_long(tmp_path: Path) -> None:
    """``dfs volume create --failover-after 8``: with the primary of both the root volume
    (cluster default, 3 s) and that volume killed, the root volume elects a new primary
    after about 3 s and the other volume only after 8 s."""
    net, nodes = _cluster(tmp_path)
    seen: dict[str, float] = {}

    def elected(vol: int) -> bool:
        return any(
            n.service is not None and n.service.roles.orders(VolumeId(vol)) and n.name != "n1"
            for n in nodes.values()
        )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await _start_all(nodes, nursery)
            svc1 = nodes["n1"].service
            assert svc1 is not None
            await svc1.fs.mkdir(ROOT_INODE, b"slow", 0o755, ROOT_CTX)
            got = await nodes["n2"].control(
                "volume.create",
                {"path": "/slow", "primary": "n1", "sites": NAMES, "failover_after": 8.0},
            )
            assert got["failover_after"] == 8.0, got
            vol = int(got["vol"])
            await _until(
                "every node knows /slow",
                lambda: all(
                    n.service is not None and n.service.volumes.get(VolumeId(vol)) is not None
                    for n in nodes.values()
                ),
            )
            await trio.sleep(2.0)  # every site in sync with n1 in both volumes
            nodes["n1"].crash()
            start = trio.current_time()
            while not (elected(1) and elected(vol)):
                await trio.sleep(0.1)
                for v in (1, vol):
                    if elected(v) and str(v) not in seen:
                        seen[str(v)] = trio.current_time() - start
                assert trio.current_time() - start < 30, seen
            for n in nodes.values():
                n.crash()

    _run(main)
    del net
    assert 3.0 <= seen["1"] < 6.0, seen
    assert 8.0 <= min(t for k, t in seen.items() if k != "1") < 11.0, seen
