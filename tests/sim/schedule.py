"""One seeded schedule: a cluster, volumes, clients, faults; then heal, settle and check.

``run_schedule(seed, tmp)`` returns a ``Report``; ``Report.violations`` lists every broken
invariant (empty: the schedule passed):

- every acknowledged operation (returned without error) is reflected on every replica of its
  volume: an acknowledged file has its contents, an acknowledged unlink/rename-away is absent;
- the replicated lmdb databases (``dfs.meta.schema.REPLICATED``) of every replica of a volume
  are identical, key by key, for that volume's inodes; and every replica's seq is the primary's;
- the offline checker ``dfs.check.checker.check`` finds nothing on any store;
- no client call took longer than ``timeouts.call`` of (mock) time, plus the allowance the
  protocol needs (``call_bound``);
- at most one node acted as primary of each (volume, epoch) (from ``VolumeRoles``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio
import trio.lowlevel
import trio.testing

from dfs.check.checker import check
from dfs.cluster.nodefs import NodeFs
from dfs.cluster.remote import LocalReader
from dfs.cluster.service import LEASE_HEARTBEATS
from dfs.errors import FsError
from dfs.fs.ctx import ROOT_CTX
from dfs.meta import schema as S
from dfs.meta.store import MetaStore
from dfs.types import ROOT_INODE, ROOT_VOLUME, InodeId, VolumeId
from tests.sim.cluster import SimNode, default_timeouts, make_config
from tests.sim.net import Faults, SimNet

T = TypeVar("T")

# Errors an operation may legally end with under faults: the primary unreachable or refusing
# (EHOSTDOWN, ETIMEDOUT, EROFS), and the volume not (yet) known to a node that restarted.
# EBADF: a handle the client's node held open on a primary that restarted meanwhile.
LEGAL = frozenset({errno.EROFS, errno.ETIMEDOUT, errno.EHOSTDOWN, errno.ESTALE, errno.EBADF})
SETTLE_LIMIT = 300.0  # mock seconds for replication to settle after healing


@dataclass
class Client:
    name: str
    node: str
    vol_path: bytes  # b"" for the root volume
    files: dict[bytes, bytes] = field(default_factory=dict)  # acknowledged contents
    gone: set[bytes] = field(default_factory=set)  # acknowledged absent
    uncertain: set[bytes] = field(default_factory=set)
    acked: int = 0
    failed: int = 0
    step: str = ""  # the NodeFs call that failed last


@dataclass
class Report:
    seed: int
    nodes: int
    volumes: int
    events: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    acked: int = 0
    failed: int = 0
    longest_call: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)


class Schedule:
    def __init__(self, seed: int, tmp: Path, *, eager: bool = False, liar: bool = False) -> None:
        """``eager``: clients start as soon as ``volume.create`` returned, not once every
        node takes part in the new volumes (see ``_volumes_known``). ``liar``: a site of the
        root volume acknowledges records without applying them (the harness's self-test)."""
        self.seed = seed
        self.eager = eager
        self.rng = random.Random(seed)
        rng = self.rng
        n = rng.choice([3, 3, 3, 4, 5, 5, 7]) if rng.random() > 0.02 else rng.randint(8, 25)
        self.names = [f"n{i + 1}" for i in range(n)]
        self.timeouts = default_timeouts()
        faults = Faults(
            delay=rng.choice([0.0005, 0.002, 0.01]),
            reset=rng.choice([0.0, 0.0, 0.002, 0.01]),
            reorder=rng.choice([0.0, 0.3]),
            duplicate=rng.choice([0.0, 0.05]),
            break_on_partition=rng.random(),
        )
        # The cluster and its volumes are set up over a network that only delays; the
        # faults start with the workload.
        self.faults = faults
        self.net = SimNet(
            random.Random(rng.getrandbits(64)), Faults(delay=faults.delay, liar=faults.liar)
        )
        root_sites = rng.sample(self.names, min(n, 3))
        self.config = make_config(self.names, root_sites[0], root_sites, self.timeouts)
        if liar:
            faults.liar = root_sites[1]
        self.nodes = {name: SimNode(self.net, self.config, name, tmp / name) for name in self.names}
        self.volumes: dict[bytes, tuple[str, list[str]]] = {b"": (root_sites[0], root_sites)}
        for k in range(rng.randint(1, 3)):
            sites = rng.sample(self.names, min(n, rng.choice([2, 3])))
            self.volumes[f"v{k}".encode()] = (sites[0], sites)
        self.report = Report(seed, n, len(self.volumes))
        self.primaries: dict[tuple[int, int], set[str]] = {}
        self.clients: list[Client] = []
        self._vol_id: dict[bytes, VolumeId] = {}
        self._running = 0
        self._clients_done = trio.Event()
        self.final: dict[bytes, str | None] = {}  # each volume's primary once settled

    def event(self, what: str) -> None:
        self.report.events.append(f"{trio.current_time():9.3f} {what}")

    def violation(self, what: str) -> None:
        self.report.violations.append(what)

    # --- driving ------------------------------------------------------------------------

    async def main(self) -> None:
        rng = self.rng
        async with trio.open_nursery() as nursery:
            # Together, as ``dfs cluster up`` or a cluster's machines booting do: a node waits
            # (bounded) for its primaries as it starts, and its sites would elect another
            # primary if it came long after them.
            async with trio.open_nursery() as starting:
                for node in self.nodes.values():
                    starting.start_soon(node.start, nursery)
            await self._create_volumes()
            if not self.eager:
                await self._volumes_known()
            self.net.faults = self.faults
            self._record_primaries()
            clients = trio.open_nursery()
            async with clients as cn:
                for k in range(rng.randint(2, 5)):
                    vol_path = rng.choice(list(self.volumes))
                    node = self.nodes[rng.choice(self.names)]
                    c = Client(f"c{k}", node.name, vol_path)
                    self.clients.append(c)
                    assert node.nursery is not None
                    self._running += 1
                    node.nursery.start_soon(self._client, c, random.Random(rng.getrandbits(64)))
                cn.start_soon(self._faults, nursery)
                cn.start_soon(self._promotions)
            # Clients run in their node's process (a crash ends them); all must be done
            # before the network heals (those cut off time out).
            while self._running:
                await self._clients_done.wait()
                self._clients_done = trio.Event()
            self.event("clients done")
            await self._heal_all(nursery)
            await self._settle()
            self._record_primaries()
            self.final = {path: self._primary_now(path) for path in self.volumes}
            await self._check_contents()
            for node in self.nodes.values():
                node.crash()
        for node in self.nodes.values():
            self._check_store(node)
        self._compare_replicas()
        for (vol, epoch), names in sorted(self.primaries.items()):
            if len(names) > 1:
                self.violation(f"volume {vol}, epoch {epoch}: primaries {sorted(names)}")
        self.report.stats = dict(self.net.stats)
        self.report.acked = sum(c.acked for c in self.clients)
        self.report.failed = sum(c.failed for c in self.clients)

    async def _create_volumes(self) -> None:
        root_primary = self.nodes[self.volumes[b""][0]]
        assert root_primary.service is not None
        fs = root_primary.service.fs
        for path, (primary, sites) in self.volumes.items():
            if not path:
                continue
            await fs.mkdir(ROOT_INODE, path, 0o755, ROOT_CTX)
            await root_primary.control(
                "volume.create", {"path": "/" + path.decode(), "primary": primary, "sites": sites}
            )
            self.event(f"volume /{path.decode()} primary {primary} sites {sites}")

    async def _volumes_known(self) -> None:
        """Wait (bounded) until every node knows every volume and every site has its root.
        A node learns of a new volume one heartbeat later (``ClusterService._watch``); in
        that window it serves it wrongly (KNOWN_BUGS in test_sim.py, run with ``eager``)."""
        deadline = trio.current_time() + 10 * self.timeouts.heartbeat
        while trio.current_time() < deadline:
            if all(self._knows_volumes(n) for n in self.nodes.values()):
                self.event("every node knows every volume")
                return
            await trio.sleep(0.1)
        self.violation("not every node knows every volume 10 heartbeats after creation")

    def _knows_volumes(self, node: SimNode) -> bool:
        assert node.service is not None and node.vfs is not None
        known = {v.path: v for v in node.service.volumes.all()}
        for path, (_, sites) in self.volumes.items():
            v = known.get("/" + path.decode())
            if v is None:
                return False
            if node.name in sites:
                try:
                    node.vfs.getattr(v.root)
                except FsError:
                    return False
        return True

    async def _faults(self, nursery: trio.Nursery) -> None:
        rng = self.rng
        for _ in range(rng.randint(2, 8)):
            await trio.sleep(rng.uniform(0.2, 6.0))
            self._record_primaries()
            up = [n for n in self.nodes.values() if n.up]
            down = [n for n in self.nodes.values() if not n.up]
            what = rng.random()
            if what < 0.3:
                names = list(self.names)
                rng.shuffle(names)
                cut = rng.randint(1, len(names) - 1)
                groups = [frozenset(names[:cut]), frozenset(names[cut:])]
                self.net.partition(groups)
                self.event(f"partition {sorted(groups[0])} | {sorted(groups[1])}")
            elif what < 0.5:
                self.net.heal()
                self.event("heal")
            elif what < 0.75 and len(up) > 1:
                victim = rng.choice(up)
                victim.crash()
                self.event(f"crash {victim.name}")
            elif down:
                node = rng.choice(down)
                self.event(f"restart {node.name}")
                await node.start(nursery)
        # Clients on nodes that are down are gone; the others finish their operations.

    async def _promotions(self) -> None:
        """Planned switch-overs (``dfs volume promote``) among the faults: asked of a node
        that is up, of any volume, to any of its sites. Refused (not in sync, unreachable, no
        primary...) or done; either way nothing acknowledged may be lost, and the request is
        answered in bounded time. Its own random numbers: the other faults' schedule of a
        seed stays what it was."""
        rng = random.Random(f"promote:{self.seed}")
        for _ in range(rng.randint(0, 3)):
            await trio.sleep(rng.uniform(0.5, 8.0))
            path = rng.choice(sorted(self.volumes))
            to = rng.choice(self.volumes[path][1])
            up = [n for n in self.nodes.values() if n.up and n.nursery is not None]
            if not up:
                continue
            node = rng.choice(up)
            assert node.nursery is not None
            node.nursery.start_soon(self._promote, node, path, to)

    async def _promote(self, node: SimNode, path: bytes, to: str) -> None:
        where = "/" + path.decode()
        start = trio.current_time()
        try:
            got = await node.control("volume.promote", {"path": where, "to": to})
            self.event(f"promote {where} to {to} on {node.name}: epoch {got['epoch']}")
        except RuntimeError as exc:
            self.event(f"promote {where} to {to} on {node.name}: refused ({exc})"[:160])
            if "internal error" in str(exc):
                self.violation(f"promote {where} to {to} on {node.name}: {exc}")
        took = trio.current_time() - start
        bound = 2 * self.timeouts.call + LEASE_HEARTBEATS * self.timeouts.heartbeat
        if took > bound:
            self.violation(f"promote {where} to {to} on {node.name} took {took:.3f} s")

    async def _heal_all(self, nursery: trio.Nursery) -> None:
        self.net.heal()
        self.event("heal all")
        for node in self.nodes.values():
            if not node.up:
                self.event(f"restart {node.name}")
                await node.start(nursery)

    async def _settle(self) -> None:
        """Wait until every node knows every volume (a node that does not store the root
        volume asks for the table every heartbeat) and every site of every volume has the
        primary's sequence."""
        start = trio.current_time()
        while True:
            lag = [
                f"{n.name} does not know every volume"
                for n in self.nodes.values()
                if not self._knows_volumes(n)
            ]
            lag = lag or self._lag()
            if not lag:
                self.event("settled")
                return
            if trio.current_time() - start > SETTLE_LIMIT:
                self.violation(f"replicas did not converge within {SETTLE_LIMIT:g} s: {lag}")
                return
            await trio.sleep(0.5)

    def _primary_now(self, path: bytes) -> str | None:
        """The node that orders the volume at ``path`` in the highest epoch (failover may have
        moved it from the one it was created with)."""
        vol = self._vol(path)
        best: tuple[int, str] | None = None
        for node in self.nodes.values():
            if node.service is not None and node.service.roles.orders(vol):
                cand = (node.service.roles.epoch(vol), node.name)
                best = cand if best is None or cand > best else best
        return best[1] if best is not None else None

    def _lag(self) -> list[str]:
        out = []
        for path, (_created, sites) in self.volumes.items():
            vol = self._vol(path)
            primary = self._primary_now(path)
            if primary is None:
                out.append(f"/{path.decode()} has no primary")
                continue
            p = self.nodes[primary]
            assert p.meta is not None
            want = p.meta.seq(vol)
            assert p.service is not None
            epoch = p.service.roles.epoch(vol)
            repl = p.service.roles.replicator(vol)
            for s in sites:
                node = self.nodes[s]
                m = node.meta
                assert m is not None and node.service is not None
                if m.seq(vol) != want:
                    out.append(f"/{path.decode()} {s} at {m.seq(vol)} of {want}")
                elif node.service.roles.epoch(vol) != epoch:
                    # Equal sequences are not the same journal across epochs: an old primary
                    # has not yet learnt the new epoch (and rolled back) — not settled.
                    out.append(f"/{path.decode()} {s} in epoch {node.service.roles.epoch(vol)}")
                elif s != primary and repl is not None and not repl.links[s].in_sync:
                    out.append(f"/{path.decode()} {s} not in sync with {primary}")
        return out

    def _vol(self, path: bytes) -> VolumeId:
        if not path:
            return ROOT_VOLUME
        node = next(n for n in self.nodes.values() if n.service is not None)
        assert node.service is not None
        for v in node.service.volumes.all():
            if v.path == "/" + path.decode():
                return v.vol
        raise AssertionError(f"volume /{path.decode()} unknown")

    def _record_primaries(self) -> None:
        for node in self.nodes.values():
            if node.service is None:
                continue
            roles = node.service.roles
            for v in node.service.volumes.all():
                if roles.orders(v.vol):
                    self.primaries.setdefault((v.vol, roles.epoch(v.vol)), set()).add(node.name)

    # --- the workload -------------------------------------------------------------------

    async def _timed(self, c: Client, what: str, call: Awaitable[T]) -> T:
        t = trio.current_time()
        try:
            return await call
        except FsError:
            c.step = c.step or what  # the first call of the operation that failed
            raise
        finally:
            took = trio.current_time() - t
            self.report.longest_call = max(self.report.longest_call, took)
            if took > self.call_bound(what):
                self.violation(f"{c.name} on {c.node}: {what} took {took:.3f} s")

    def call_bound(self, what: str) -> float:
        """How long one NodeFs call may take: everything it waits for shares one deadline,
        ``timeouts.call`` from its start (dfs.cluster.deadline), and the allowance the
        protocol needs on top of it is one read lease: a volume's primary acknowledges an
        update without a site that stopped answering (given up after ``timeouts.call``) only
        once that site's lease has run out (Replicator.wait). A release, which no system call
        waits for, then closes the handle on the primary with a deadline of its own."""
        t = self.timeouts
        lease = LEASE_HEARTBEATS * t.heartbeat
        return (2 * t.call if what == "release" else t.call) + lease

    async def _client(self, c: Client, rng: random.Random) -> None:
        try:
            await self._client_ops(c, rng)
        finally:
            self._running -= 1
            self._clients_done.set()

    async def _client_ops(self, c: Client, rng: random.Random) -> None:
        node = self.nodes[c.node]
        assert node.service is not None
        fs = node.service.fs
        if c.vol_path:
            try:
                got = await self._timed(c, "lookup", fs.lookup(ROOT_INODE, c.vol_path))
                root = got.ino
            except FsError as exc:
                if exc.errno not in LEGAL:
                    self.violation(
                        f"{c.name} on {c.node}: lookup of /{c.vol_path.decode()}: {exc!r}"
                    )
                return
        else:
            root = ROOT_INODE
        for k in range(rng.randint(5, 30)):
            await trio.sleep(rng.uniform(0, 0.5))
            mine = sorted(c.files)
            op = rng.random()
            if op < 0.5 or not mine:
                name = f"{c.name}-{k}".encode()
                data = rng.randbytes(rng.choice([10, 300, 5000, 70000]))
                await self._op(c, [name], self._create(c, fs, root, name, data))
                if name not in c.uncertain:
                    c.files[name] = data
            elif op < 0.75:
                old = rng.choice(mine)
                new = f"{c.name}-{k}".encode()
                await self._op(
                    c, [old, new], self._timed(c, "rename", fs.rename(root, old, root, new, 0))
                )
                if old not in c.uncertain:
                    c.files[new] = c.files.pop(old)
                    c.gone.add(old)
            else:
                old = rng.choice(mine)
                await self._op(c, [old], self._timed(c, "unlink", fs.unlink(root, old)))
                if old not in c.uncertain:
                    del c.files[old]
                    c.gone.add(old)

    async def _create(self, c: Client, fs: NodeFs, root: InodeId, name: bytes, data: bytes) -> None:
        fh, _ = await self._timed(c, "create", fs.create(root, name, 0o644, os.O_RDWR, ROOT_CTX))
        try:
            await self._timed(c, "write", fs.write(fh, 0, data))
            await self._timed(c, "fsync", fs.fsync(fh, False))
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(FsError):
                await self._timed(c, "release", fs.release(fh))

    async def _op(self, c: Client, names: list[bytes], call: object) -> None:
        """Run ``call``; on an error (or a crash of the client's node) its names become
        uncertain."""
        ok = False
        c.step = ""
        try:
            await call  # type: ignore[misc]
            ok = True
            c.acked += 1
        except FsError as exc:
            c.failed += 1
            if exc.errno not in LEGAL:
                self.violation(
                    f"{c.name} on {c.node}: {names}: {c.step}: unexpected {exc!r}"
                    f" at {trio.current_time():.3f}"
                )
        finally:
            if not ok:
                for n in names:
                    c.uncertain.add(n)
                    c.files.pop(n, None)
                    c.gone.discard(n)

    # --- the checks ---------------------------------------------------------------------

    async def _check_contents(self) -> None:
        self._vol_id = {p: self._vol(p) for p in self.volumes}
        for c in self.clients:
            vol_primary, sites = self.volumes[c.vol_path]
            for s in sites:
                node = self.nodes[s]
                assert node.vfs is not None and node.service is not None
                vfs = node.vfs
                root = ROOT_INODE
                mount_dir: InodeId | None = None
                if c.vol_path:
                    path = "/" + c.vol_path.decode()
                    known = [v for v in node.service.volumes.all() if v.path == path]
                    if not known:
                        self.violation(f"{s} does not know the volume {path} after settling")
                        continue
                    v = known[0]
                    root = v.root
                    if node.service.roles.stores(ROOT_VOLUME):
                        mount_dir = v.mount_dir
                for name, data in c.files.items():
                    a = vfs.peek(root, name)
                    if a is None:
                        where = ""
                        if mount_dir is not None and vfs.peek(mount_dir, name) is not None:
                            where = " (it is in the covered mount-point directory instead)"
                        self.violation(f"{s}: acknowledged {name!r} of {c.name} missing{where}")
                        continue
                    got = await LocalReader(vfs).read(a.ino, 0, len(data) + 1)
                    if got != data:
                        self.violation(
                            f"{s}: acknowledged {name!r} of {c.name}: {len(got)} bytes, "
                            f"not the {len(data)} written"
                        )
                for name in c.gone:
                    if vfs.peek(root, name) is not None:
                        self.violation(f"{s}: {name!r} of {c.name} was removed but is there")

    def _check_store(self, node: SimNode) -> None:
        meta = MetaStore.open(node.dir / "meta")
        try:
            from dfs.data.store import DataStore

            found = [
                f for f in check(meta, DataStore(node.dir / "data")) if f.code != "dirty-unsettled"
            ]
            for f in found:
                self.violation(f"checker on {node.name}: {f}")
        finally:
            meta.close()

    def _compare_replicas(self) -> None:
        dumps = {name: _replicated(self.nodes[name].dir) for name in self.names}
        for path, (created, sites) in self.volumes.items():
            primary = self.final.get(path) or created
            want = _of_volume(dumps[primary], self._vol_id[path])
            for s in sites:
                got = _of_volume(dumps[s], self._vol_id[path])
                if got != want:
                    diff = sorted(set(got.items()) ^ set(want.items()))[:5]
                    self.violation(f"/{path.decode()}: {s} differs from primary {primary}: {diff}")


def _replicated(d: Path) -> tuple[dict[int, int], dict[tuple[int, bytes], bytes]]:
    """(inode -> volume, (db, key) -> value) of one store's replicated databases."""
    meta = MetaStore.open(d / "meta")
    vols: dict[int, int] = {}
    out: dict[tuple[int, bytes], bytes] = {}
    try:
        with meta.read() as txn:
            for k, v in txn.cursor(db=meta.dbs["inodes"]):
                ino = S.read_u64(bytes(k)[:8])
                vols[ino] = S.unpack_inode(ino, bytes(v)).volume
            for i in S.REPLICATED:
                for k, v in txn.cursor(db=meta.dbs[S.DB_NAMES[i]]):
                    out[i, bytes(k)] = bytes(v)
    finally:
        meta.close()
    return vols, out


def _of_volume(
    dump: tuple[dict[int, int], dict[tuple[int, bytes], bytes]], vol: int
) -> dict[tuple[int, bytes], bytes]:
    vols, recs = dump
    out = {}
    for (db, key), value in recs.items():
        ino = S.read_u64(key[:8])
        if vols.get(ino, -1) == vol:
            out[db, key] = value
    return out


async def _inline(fn: Callable[..., T], *args: Any, **_: Any) -> T:
    """``trio.to_thread.run_sync`` in the simulation: the blocking call runs on the loop, so
    its duration is not raced against the mock clock (with ``autojump_threshold=0`` the clock
    jumps while a worker thread runs, and the outcome would depend on the machine's speed)."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Same seed, same run: worker threads inline, trio's scheduler shuffles seeded.

    ``trio._core._run._r`` is the random source of trio's scheduling order (private; what
    trio's hypothesis plugin seeds too)."""
    core: Any = trio._core._run
    state = core._r.getstate()
    allowed = core._ALLOW_DETERMINISTIC_SCHEDULING
    run_sync = trio.to_thread.run_sync
    core._r.seed(seed)
    # Tasks woken together (deadlines that tie are ordered by id() in trio) are sorted by
    # creation before the seeded shuffle: what pytest-trio does under hypothesis.
    core._ALLOW_DETERMINISTIC_SCHEDULING = True
    trio.to_thread.run_sync = _inline  # type: ignore[assignment]
    try:
        yield
    finally:
        trio.to_thread.run_sync = run_sync
        core._ALLOW_DETERMINISTIC_SCHEDULING = allowed
        core._r.setstate(state)


def run_schedule(seed: int, tmp: Path, *, eager: bool = False, liar: bool = False) -> Report:
    sched = Schedule(seed, tmp, eager=eager, liar=liar)
    with deterministic(seed):
        trio.run(sched.main, clock=trio.testing.MockClock(autojump_threshold=0))
    return sched.report
