"""Primary-site replication without FUSE: three nodes' stores in one process, and crashes.

The primary's ``NodeFs`` and ``Replicator`` run against two ``ReplicaApplier``
sites, on trio's MockClock (so lease waits take no real time), in both ways a
primary ships records: a task per ``call`` (no ``peer``), and streaming through
``post`` over an in-order fake connection (``FakePeer``, what
``dfs.net.peer.Peer`` does over TCP). Checked: every update has been applied by
every site in sync when it returns; concurrent updates are pipelined and
batched; a site that drops out delays updates by at most its lease, misses
nothing, and catches up; at the end every replicated database is
byte-for-byte equal on all three nodes, and so are the files' contents.

A site applies a request's records in one transaction after their data
changes: ``test_batched_apply_survives_kill_9`` kills a process applying
batches at random moments and checks that the replica is the primary's
history up to the sequence it reports, every time. ``Peer.post`` is tested
over real loopback TCP, against a server that runs the method ``in_order``.
"""

from __future__ import annotations

import errno
import functools
import os
import random
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from dfs.cluster.nodefs import NodeFs
from dfs.cluster.opserver import OpServer
from dfs.cluster.replication import WINDOW, ReplicaApplier, Replicator
from dfs.cluster.roles import VolumeRoles
from dfs.config import Timeouts
from dfs.data.store import DataStore
from dfs.errors import FsError
from dfs.fs.ctx import ROOT_CTX, SetAttrs
from dfs.fs.vfs import Vfs
from dfs.meta import schema as S
from dfs.meta.replica import ReplicaError, apply_writeset, decode_record
from dfs.meta.store import MetaStore
from dfs.net.frames import (
    Field,
    Message,
    MessageType,
    Packed,
    encode,
    encode_request,
    pack_args,
)
from dfs.net.peer import Peer, Pending
from dfs.net.rpc import Methods, PeerUnavailable, RemoteError
from dfs.net.server import RpcServer
from dfs.types import ROOT_INODE, ROOT_VOLUME, InodeId, NodeId, VolumeId
from tests.waiting import await_until

LEASE = 3.0
WRITERS = 2 * WINDOW
ROUNDS = 12
T0 = 1_700_000_000_000_000_000


def fixed_clock() -> int:
    return T0


class Node:
    """One node's stores in-process; ``replica``: a storage site of every volume."""

    def __init__(self, root: Path, node_id: int, *, replica: bool = False) -> None:
        self.meta = MetaStore.open(
            root / "meta", cluster_id="c", node_id=NodeId(node_id), clock=fixed_clock
        )
        self.data = DataStore(root / "data")
        self.vfs = Vfs(self.meta, self.data, replica=(lambda vol: True) if replica else None)


def serve_ops(fs: NodeFs, methods: Methods) -> OpServer:
    """The primary ``fs``'s side of forwarded updates, registered on ``methods`` (node "nK"
    has id K)."""
    ops = OpServer(fs.vfs, fs.roles, fs.commits, fs.writes, lambda name: NodeId(int(name[1:])))
    ops.register(methods)
    return ops


def replicating_to(
    primary: Node, applier: ReplicaApplier
) -> tuple[Replicator, dict[str, trio.Event]]:
    """A Replicator of the root volume from ``primary`` to one site, "n2", whose
    ``repl.apply`` is ``applier`` called in-process; while ``gate["open"]`` is not set,
    nothing is applied (the site looks slow or stuck)."""
    gate = {"open": trio.Event()}
    gate["open"].set()

    async def call(node: str, method: str, args: dict[str, Any], limit: float) -> Any:
        if args["records"]:
            await gate["open"].wait()
        return {"have": await applier.apply(args["vol"], args["records"])}

    repl = Replicator(
        primary.meta, primary.data, ROOT_VOLUME, ["n2"], call, call_timeout=60.0, lease=3.0
    )
    return repl, gate


def replicated(meta: MetaStore) -> list[tuple[str, list[tuple[bytes, bytes]]]]:
    out = []
    with meta.read() as txn:
        for i in S.REPLICATED:
            name = S.DB_NAMES[i]
            out.append((name, [(bytes(k), bytes(v)) for k, v in txn.cursor(db=meta.dbs[name])]))
    return out


def mock_clock() -> trio.testing.MockClock:
    # Not 0: a site applying a large write does it in a worker thread, and the clock must
    # not jump past call deadlines while it does.
    return trio.testing.MockClock(autojump_threshold=0.02)


class FakePeer:
    """A site behind one in-order connection: what ``Peer.post`` and the server's
    ``in_order`` give. ``down`` loses the connection: posted requests fail, new ones
    are refused."""

    def __init__(self, name: str, applier: ReplicaApplier, rng: random.Random) -> None:
        self.name = name
        self.applier = applier
        self.rng = rng
        self.down = False
        self.posted = 0
        self._queue: deque[tuple[Pending, dict[str, Any]]] = deque()
        self._wake = trio.Event()
        self._rid = 0

    def post(self, method: str, args: Packed, on_done: Callable[[Pending], None]) -> Pending:
        assert method == "repl.apply"
        if self.down:
            raise PeerUnavailable(f"node {self.name}: not connected")
        self._rid += 1
        self.posted += 1
        pending = Pending(self.name, self._rid, on_done)
        self._queue.append((pending, msgpack.unpackb(args.data)))
        self._wake.set()
        return pending

    def abandon(self, pending: Pending) -> None:
        pending.on_done = None

    def lose_connection(self) -> None:
        self.down = True
        while self._queue:
            self._queue.popleft()[0].fail("connection lost")

    async def serve(self) -> None:
        while True:
            while not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            pending, args = self._queue.popleft()
            await trio.sleep(self.rng.random() * 0.002)  # the network
            have = await self.applier.apply(VolumeId(args["vol"]), args["records"])
            if pending.done.is_set():
                continue  # failed with the connection meanwhile
            pending.answer(Message(MessageType.RESPONSE, pending.rid, {"r": {"have": have}}))


def three_nodes(tmp_path: Path) -> tuple[Node, dict[str, Node], dict[str, ReplicaApplier]]:
    primary = Node(tmp_path / "n1", 1)
    sites = {name: Node(tmp_path / name, i, replica=True) for i, name in ((2, "n2"), (3, "n3"))}
    appliers = {
        name: ReplicaApplier(n.meta, n.data, NodeId(i))
        for i, (name, n) in enumerate(sites.items(), start=2)
    }
    return primary, sites, appliers


def checked_waits(repl: Replicator, sites: dict[str, Node]) -> list[int]:
    """Make ``repl.wait`` assert the contract when it returns; returns the seqs waited for."""
    waited: list[int] = []
    inner = repl.wait

    async def wait(seq: int | None = None) -> None:
        want = repl.meta.seq(repl.vol) if seq is None else seq
        await inner(want)
        for name, link in repl.links.items():
            if link.in_sync:
                have = sites[name].meta.seq(ROOT_VOLUME)
                assert have >= want, f"{name} has {have}, update {want} acknowledged"
        waited.append(want)

    repl.wait = wait  # type: ignore[method-assign]
    return waited


def assert_replicas_equal(primary: Node, sites: dict[str, Node], files: list[InodeId]) -> None:
    want = replicated(primary.meta)
    for name, n in sites.items():
        assert n.meta.seq(ROOT_VOLUME) == primary.meta.seq(ROOT_VOLUME), name
        assert replicated(n.meta) == want, name
        assert list(n.meta.journal_entries(ROOT_VOLUME)) == list(
            primary.meta.journal_entries(ROOT_VOLUME)
        ), name
    for ino in files:
        expect = primary.data.path(ino).read_bytes()
        for name, n in sites.items():
            assert n.data.path(ino).read_bytes() == expect, name


def test_updates_wait_for_sites_and_a_dropped_site_catches_up(tmp_path: Path) -> None:
    """One RPC per request (``call``), as before a ``post``-capable peer is wired."""
    primary, sites, appliers = three_nodes(tmp_path)
    down: set[str] = set()

    async def call(site: str, method: str, args: dict[str, Any], limit: float) -> Any:
        await trio.sleep(0.001)  # a network hop
        if site in down:
            raise PeerUnavailable(f"{site} is down")
        assert method == "repl.apply"
        return {"have": await appliers[site].apply(args["vol"], args["records"])}

    repl = Replicator(
        primary.meta, primary.data, ROOT_VOLUME, sites, call, call_timeout=60.0, lease=LEASE
    )
    waited = checked_waits(repl, sites)
    fs = NodeFs(primary.vfs, VolumeRoles.alone(primary.meta, repl))
    big = os.urandom(300_000)
    files: list[InodeId] = []

    def in_sync_everywhere() -> None:
        want = primary.meta.seq(ROOT_VOLUME)
        for name, n in sites.items():
            if name not in down:
                assert n.meta.seq(ROOT_VOLUME) == want, name

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(repl.run)
            await await_until(
                "every site in sync", lambda: all(link.in_sync for link in repl.links.values())
            )
            d = await fs.mkdir(ROOT_INODE, b"d", 0o755, ROOT_CTX)
            in_sync_everywhere()
            fh, f = await fs.create(d.ino, b"f", 0o644, os.O_RDWR, ROOT_CTX)
            files.append(f.ino)
            await fs.write(fh, 0, big)
            await repl.wait()  # a write may be acknowledged at close (NodeFs decides)
            in_sync_everywhere()
            await fs.setxattr(f.ino, b"user.k", b"v")
            await fs.rename(d.ino, b"f", ROOT_INODE, b"g", 0)
            in_sync_everywhere()
            # n3 holds a lease, then dies: the next update waits for the lease, no longer.
            assert repl.grant("n3")
            down.add("n3")
            start = trio.current_time()
            await fs.setattr(f.ino, SetAttrs(mode=0o640), ROOT_CTX)
            waited_for = trio.current_time() - start
            assert LEASE - 0.1 <= waited_for <= LEASE + 1.0, waited_for
            assert not repl.grant("n3")
            await fs.write(fh, 1000, b"x" * 5000)
            await repl.wait()
            start = trio.current_time()
            for i in range(20):
                await fs.mkdir(d.ino, b"sub%d" % i, 0o700, ROOT_CTX)
            await fs.unlink(ROOT_INODE, b"g")  # open: an orphan, purged later
            assert trio.current_time() - start < 1.0, "updates kept waiting for a dead site"
            in_sync_everywhere()
            await fs.release(fh)
            # n3 comes back: it catches up from the journal and is in sync again.
            down.clear()
            repl.kick("n3")
            await await_until("n3 in sync", lambda: repl.links["n3"].in_sync)
            in_sync_everywhere()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=mock_clock())
    assert len(waited) > 25
    assert_replicas_equal(primary, sites, files)
    expect = big[:1000] + b"x" * 5000 + big[6000:]
    assert primary.data.path(files[0]).read_bytes() == expect
    ino = primary.vfs.peek(ROOT_INODE, b"d")
    assert ino is not None
    for name, n in [("n1", primary), *sites.items()]:
        a = n.vfs.peek(ino.ino, b"sub19")
        assert a is not None and a.mode & 0o777 == 0o700, name


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_streaming_pipelines_concurrent_updates_and_survives_a_lost_site(
    tmp_path: Path, seed: int
) -> None:
    """Streaming through ``post``: writers in parallel, a site lost and back mid-way."""
    rng = random.Random(seed)
    primary, sites, appliers = three_nodes(tmp_path)
    peers = {name: FakePeer(name, appliers[name], rng) for name in sites}

    async def call(site: str, method: str, args: dict[str, Any], limit: float) -> Any:
        await trio.sleep(0.001)
        if peers[site].down:
            raise PeerUnavailable(f"{site} is down")
        return {"have": await appliers[site].apply(args["vol"], args["records"])}

    repl = Replicator(
        primary.meta,
        primary.data,
        ROOT_VOLUME,
        sites,
        call,
        call_timeout=60.0,
        lease=LEASE,
        peer=peers.get,
    )
    waited = checked_waits(repl, sites)
    fs = NodeFs(primary.vfs, VolumeRoles.alone(primary.meta, repl))
    files: list[InodeId] = []
    batches: list[int] = []
    apply = appliers["n2"].apply

    async def counting_apply(vol: VolumeId, records: list[Any]) -> int:
        batches.append(len(records))
        return await apply(vol, records)

    appliers["n2"].apply = counting_apply  # type: ignore[method-assign]

    async def writer(k: int) -> None:
        d = await fs.mkdir(ROOT_INODE, b"w%d" % k, 0o755, ROOT_CTX)
        fh, f = await fs.create(d.ino, b"f", 0o644, os.O_RDWR, ROOT_CTX)
        files.append(f.ino)
        for i in range(ROUNDS):
            size = rng.choice([100, 5000, 70_000, 200_000])
            await fs.write(fh, rng.randrange(0, 100_000), os.urandom(size))
            await fs.setattr(f.ino, SetAttrs(mode=0o600 + i % 8), ROOT_CTX)
            await fs.mkdir(d.ino, b"s%d" % i, 0o700, ROOT_CTX)
            if i % 5 == 4:
                await fs.rename(d.ino, b"s%d" % i, d.ino, b"r%d" % i, 0)
                await fs.rmdir(d.ino, b"s%d" % (i - 1))
        await fs.fsync(fh, False)
        await fs.release(fh)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for p in peers.values():
                nursery.start_soon(p.serve)
            nursery.start_soon(repl.run)
            await await_until(
                "every link streaming", lambda: all(link.streaming for link in repl.links.values())
            )
            async with trio.open_nursery() as writers:
                for k in range(WRITERS):  # more than WINDOW: some records wait, in batches
                    writers.start_soon(writer, k)
                await trio.sleep(0.02)
                peers["n3"].lose_connection()
                await await_until("n3 out of sync", lambda: not repl.links["n3"].in_sync)
                await trio.sleep(LEASE + 0.5)
                peers["n3"].down = False
                repl.kick("n3")
            await await_until(
                "every link streaming", lambda: all(link.streaming for link in repl.links.values())
            )
            await repl.wait()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=mock_clock())
    assert_replicas_equal(primary, sites, files)
    assert len(waited) >= WRITERS * ROUNDS * 3
    assert peers["n2"].posted > 0 and peers["n3"].posted > 0
    assert max(batches) > 1, "concurrent updates were never batched"


def _items(meta: MetaStore, data: DataStore) -> list[list[Any]]:
    """The journal as a primary ships it: [seq, record, bytes of each write]."""
    out: list[list[Any]] = []
    for seq, raw in meta.journal_entries(ROOT_VOLUME):
        blobs: list[bytes | None] = []
        for op in decode_record(raw).data:
            fd = data.open(InodeId(op[1]), create=False) if op[0] == "w" else None
            if fd is None:
                blobs.append(None)
                continue
            try:
                blobs.append(DataStore.pread(fd, op[2], op[3], op[2] + op[3]))
            finally:
                data.close(fd)
        out.append([seq, raw, blobs])
    return out


def _history(root: Path, rounds: int) -> tuple[Node, list[list[Any]]]:
    """A primary with ``rounds`` x 10 updates of every kind, some with data-file writes."""
    node = Node(root, 1)
    vfs = node.vfs

    async def work() -> None:
        d = vfs.mkdir(ROOT_INODE, b"d", 0o755, ROOT_CTX)
        for i in range(rounds):
            fh, f = vfs.create(d.ino, b"f%d" % i, 0o644, os.O_RDWR, ROOT_CTX)
            await vfs.files.write(fh, 0, os.urandom(100 + (i % 4) * 40_000))
            await vfs.setattr(f.ino, SetAttrs(mode=0o600), ROOT_CTX)
            vfs.mkdir(d.ino, b"s%d" % i, 0o700, ROOT_CTX)
            vfs.symlink(d.ino, b"l%d" % i, b"f%d" % i, ROOT_CTX)
            vfs.setxattr(f.ino, b"user.k", b"v%d" % i, 0)
            vfs.rename(d.ino, b"f%d" % i, d.ino, b"g%d" % i, 0)
            if i % 3 == 2:
                vfs.unlink(d.ino, b"g%d" % (i - 1))
            await vfs.files.release(fh)

    trio.run(work)
    return node, _items(node.meta, node.data)


_APPLY_CHILD = """
import random, sys
from pathlib import Path
import msgpack
from dfs.cluster.replication import ReplicaApplier
from dfs.data.store import DataStore
from dfs.meta.store import MetaStore
from dfs.types import ROOT_VOLUME, NodeId
root, items_path, seed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
items = msgpack.unpackb(open(items_path, "rb").read())
meta = MetaStore.open(root / "meta", cluster_id="c", node_id=NodeId(2))
applier = ReplicaApplier(meta, DataStore(root / "data"), NodeId(2))
rng = random.Random(seed)
print("ready", flush=True)
while meta.seq(ROOT_VOLUME) < len(items):
    have = meta.seq(ROOT_VOLUME)
    n = rng.randint(1, 40)
    applier._apply_batch(ROOT_VOLUME, items[max(0, have - 2) : have + n], [])
print("done", flush=True)
"""


def test_batched_apply_survives_kill_9(tmp_path: Path) -> None:
    """kill -9 while batches are applied: the replica is always the primary's history up to
    the sequence it reports (every replicated record, and the journal, byte for byte)."""
    primary, items = _history(tmp_path / "n1", 300)
    items_path = tmp_path / "items"
    items_path.write_bytes(msgpack.packb(items))
    site = tmp_path / "n2"
    Node(site, 2).meta.close()
    ref = Node(tmp_path / "ref", 2)
    rng = random.Random(7)
    kills = 0
    for attempt in range(40):
        child = subprocess.Popen(
            [sys.executable, "-c", _APPLY_CHILD, str(site), str(items_path), str(attempt)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n"
            try:
                child.wait(timeout=rng.random() * 0.05)
            except subprocess.TimeoutExpired:
                os.kill(child.pid, signal.SIGKILL)
                kills += 1
            child.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()
        meta = MetaStore.open(site / "meta", cluster_id="c", node_id=NodeId(2))
        try:
            have = meta.seq(ROOT_VOLUME)
            for seq, raw, _blobs in items[ref.meta.seq(ROOT_VOLUME) : have]:
                apply_writeset(ref.meta, ROOT_VOLUME, seq, raw)
            assert replicated(meta) == replicated(ref.meta), f"replica at {have} differs"
            assert list(meta.journal_entries(ROOT_VOLUME)) == [(s, r) for s, r, _b in items][:have]
        finally:
            meta.close()
        if have == len(items):
            break
    assert kills >= 3, "the applying process was never killed mid-way"
    assert ref.meta.seq(ROOT_VOLUME) == len(items), "the replica never caught up"
    assert replicated(ref.meta) == replicated(primary.meta)


def test_a_batch_that_fails_half_way_changes_no_metadata(tmp_path: Path) -> None:
    primary, items = _history(tmp_path / "n1", 6)
    site = Node(tmp_path / "n2", 2)
    applier = ReplicaApplier(site.meta, site.data, NodeId(2))
    applier._apply_batch(ROOT_VOLUME, items[:10], [])
    before = replicated(site.meta)
    bad = [list(item) for item in items[10:20]]
    bad[5][1] = b"\x81\xa2op\xc0"  # a malformed record in the middle of the batch
    with pytest.raises(ReplicaError):
        applier._apply_batch(ROOT_VOLUME, bad, [])
    assert site.meta.seq(ROOT_VOLUME) == 10
    assert replicated(site.meta) == before
    # Overlapping and out-of-order requests: what is applied is skipped, a gap stops.
    assert applier._apply_batch(ROOT_VOLUME, items[15:20], []) == 10
    assert applier._apply_batch(ROOT_VOLUME, items[5:15], []) == 15
    assert applier._apply_batch(ROOT_VOLUME, items[12:], []) == len(items)
    assert replicated(site.meta) == replicated(primary.meta)


def test_encode_request_is_byte_for_byte_encode() -> None:
    args = {"vol": 1, "records": [[7, b"\x00" * 300, [None, b"y" * 70_000]]]}
    for rid in (1, 127, 128, 65_535, 65_536, 1 << 40):
        want = encode(MessageType.REQUEST, rid, {"m": "repl.apply", "a": args})
        assert encode_request(rid, "repl.apply", pack_args(args)) == want


def test_post_pipelines_in_order_and_abandon_and_loss_are_handled() -> None:
    seen: list[int] = []

    async def step(peer: str, a: dict[str, Any]) -> int:
        await trio.sleep(0.001 * (a["i"] % 3))  # would reorder tasks, not in_order requests
        seen.append(a["i"])
        if a["i"] == 13:
            raise FsError(errno.EPROTO, "thirteen")
        return int(a["i"])

    methods = Methods()
    methods.add("step", {"i": Field(int)}, step, in_order=True)
    server = RpcServer(
        cluster_id="c", node_name="n2", secret=b"s" * 32, known={"n1", "n2"}, methods=methods
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run, ("127.0.0.1", 0))
            peer = Peer(
                "n2",
                "127.0.0.1",
                port,
                secret=b"s" * 32,
                cluster_id="c",
                my_name="n1",
                timeouts=Timeouts(),
                nursery=nursery,
            )
            with pytest.raises(PeerUnavailable):
                peer.post("step", {"i": 0}, lambda p: None)  # no connection yet
            assert await peer.call("step", {"i": 0}) == 0
            done: list[tuple[int, Any]] = []

            def on_done(i: int, p: Pending) -> None:
                try:
                    done.append((i, p.result()))
                except (RemoteError, PeerUnavailable) as exc:
                    done.append((i, exc))

            posted = [
                peer.post("step", {"i": i}, functools.partial(on_done, i)) for i in range(1, 40)
            ]
            peer.abandon(posted[20])  # i = 21: its answer is dropped
            await await_until("38 calls done", lambda: len(done), ok=(38).__eq__)
            assert seen == list(range(40))
            assert [i for i, _r in done] == [i for i in range(1, 40) if i != 21]
            for i, r in done:
                if i == 13:
                    assert isinstance(r, RemoteError)
                else:
                    assert r == i
            # Losing the connection fails what is in flight, through on_done.
            lost: list[Pending] = []
            slow = peer.post("step", {"i": 101}, lost.append)
            peer.close_nowait()
            await await_until("a call lost", lambda: lost)
            assert lost == [slow] and slow.failure is not None
            with pytest.raises(PeerUnavailable):
                slow.result()
            nursery.cancel_scope.cancel()

    trio.run(main)
