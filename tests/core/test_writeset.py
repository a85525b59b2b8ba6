"""Write-set journal records: replaying a primary's journal on a replica gives the same store.

The primary is a whole core (``Core``); a replica is a fresh MetaStore of the
same cluster with another node id, to which every journal record is applied
in order with ``apply_writeset``. Both stores are created with the same fixed
clock, so their root inodes (written at creation, not journaled) are equal.
File data in data files is not part of a write-set (it travels with write
requests): before comparing contents or running the checker on the replica,
the tests copy the primary's data files into the replica's data directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfs.check.checker import check
from dfs.data.store import DataStore
from dfs.errors import Exists, FsError
from dfs.fs.ctx import SetAttrs
from dfs.fs.vfs import RENAME_EXCHANGE
from dfs.meta import schema as S
from dfs.meta.replica import ReplicaError, apply_writeset
from dfs.meta.store import MetaStore
from dfs.types import ROOT_VOLUME, NodeId
from tests.core.harness import Core, run

T0 = 1_700_000_000_000_000_000
REPLICATED_NAMES = [S.DB_NAMES[i] for i in S.REPLICATED]


def fixed_clock() -> int:
    return T0


def new_primary(root: Path) -> Core:
    MetaStore.open(root / "meta", clock=fixed_clock).close()
    return Core(root)


def new_replica(root: Path, primary: Core) -> tuple[MetaStore, DataStore]:
    meta = MetaStore.open(
        root / "meta",
        cluster_id=primary.meta.identity.cluster_id,
        node_id=NodeId(2),
        clock=fixed_clock,
    )
    return meta, DataStore(root / "data")


def records(meta: MetaStore, after: int = 0) -> list[tuple[int, bytes]]:
    return list(meta.journal_entries(ROOT_VOLUME, after))


def replay(meta: MetaStore, recs: list[tuple[int, bytes]]) -> None:
    for seq, rec in recs:
        apply_writeset(meta, ROOT_VOLUME, seq, rec)


def dump(meta: MetaStore) -> dict[str, list[tuple[bytes, bytes]]]:
    with meta.read() as txn:
        return {name: list(txn.cursor(db=meta.dbs[name])) for name in REPLICATED_NAMES}


def assert_same(primary: MetaStore, replica: MetaStore) -> None:
    a, b = dump(primary), dump(replica)
    for name in REPLICATED_NAMES:
        assert a[name] == b[name], f"database {name} differs"
    assert replica.seq(ROOT_VOLUME) == primary.seq(ROOT_VOLUME)
    assert records(replica) == records(primary)


def copy_data(primary: Core, replica_data: DataStore) -> None:
    shutil.copytree(primary.data.root, replica_data.root, dirs_exist_ok=True)


@pytest.fixture
def replica(tmp_path: Path, core: Core) -> Iterator[tuple[MetaStore, DataStore]]:
    meta, data = new_replica(tmp_path / "replica", core)
    try:
        yield meta, data
    finally:
        meta.close()


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[Core]:
    c = new_primary(tmp_path / "primary")
    try:
        yield c
        c.settle()
        assert not c.findings()
    finally:
        c.close()


def workload(c: Core) -> None:
    c.mkdir("/d")
    c.mkdir("/d/sub")
    c.write_file("/d/small", b"hello inline")
    big = os.urandom(200_000) + bytes(70_000)  # past INLINE_MAX: a data file, with a hole
    c.write_file("/big", big)
    c.truncate("/big", 100_000)
    c.truncate("/d/small", 5)
    fh, _ = c.create("/grow")
    c.write(fh, 0, b"a" * 1000)
    c.write(fh, 60_000, b"b" * 10_000)  # moves from inline to a data file
    c.fsync(fh)
    c.release(fh)
    c.rename("/d/small", "/small")
    c.rename("/d/sub", "/big", RENAME_EXCHANGE)  # a directory and a file swap places
    c.link("/small", "/d/link")
    c.symlink("/d/sym", b"../small")
    ino = c.ino("/small")
    c.vfs.setxattr(ino, b"user.a", b"1" * 1000)
    c.vfs.setxattr(ino, b"user.b", b"2")
    c.vfs.removexattr(ino, b"user.a")
    run(c.vfs.setattr, ino, SetAttrs(mode=0o600, uid=12, mtime_ns=T0 + 5), c.ctx)
    fh, a = c.create("/tmpfile")
    c.write(fh, 0, b"x" * 100_000)
    c.unlink("/tmpfile")  # open and unlinked: an orphan until released and forgotten
    c.write(fh, 100_000, b"y")
    c.release(fh)
    c.vfs.forget([(a.ino, c.vfs.lookups.get(a.ino, 0))])
    c.unlink("/d/link")
    c.write_file("/d/x", b"")
    c.rmdir("/d/sub") if c.resolve("/d/sub").is_dir else c.unlink("/d/sub")
    c.rename("/d/x", "/small")  # replaces a file that has xattrs and another name
    c.settle()


def test_replica_converges(core: Core, replica: tuple[MetaStore, DataStore]) -> None:
    rmeta, rdata = replica
    workload(core)
    recs = records(core.meta)
    assert len(recs) == core.meta.seq(ROOT_VOLUME) > 20
    replay(rmeta, recs)
    assert_same(core.meta, rmeta)
    copy_data(core, rdata)
    assert check(rmeta, rdata) == []


def test_replay_in_steps(primary: Core, tmp_path: Path) -> None:
    """A replica that applies records as they come equals the primary after each step."""
    rmeta, _ = new_replica(tmp_path / "replica", primary)
    try:
        primary.mkdir("/a")
        replay(rmeta, records(primary.meta))
        assert_same(primary.meta, rmeta)
        done = rmeta.seq(ROOT_VOLUME)
        primary.write_file("/a/f", b"data")
        primary.rename("/a/f", "/f")
        replay(rmeta, records(primary.meta, done))
        assert_same(primary.meta, rmeta)
    finally:
        rmeta.close()


def test_gap_and_duplicate_raise(primary: Core, tmp_path: Path) -> None:
    rmeta, _ = new_replica(tmp_path / "replica", primary)
    try:
        primary.mkdir("/a")
        primary.mkdir("/b")
        primary.mkdir("/c")
        recs = records(primary.meta)
        with pytest.raises(ReplicaError, match="gap"):
            apply_writeset(rmeta, ROOT_VOLUME, *recs[1])
        assert rmeta.seq(ROOT_VOLUME) == 0
        apply_writeset(rmeta, ROOT_VOLUME, *recs[0])
        with pytest.raises(ReplicaError, match="duplicate"):
            apply_writeset(rmeta, ROOT_VOLUME, *recs[0])
        with pytest.raises(ReplicaError, match="gap"):
            apply_writeset(rmeta, ROOT_VOLUME, *recs[2])
        replay(rmeta, recs[1:])
        assert_same(primary.meta, rmeta)
    finally:
        rmeta.close()


def test_malformed_record_raises(primary: Core, tmp_path: Path) -> None:
    rmeta, _ = new_replica(tmp_path / "replica", primary)
    try:
        bad = [
            b"\xc1",
            msgpack.packb(["mkdir"]),
            msgpack.packb({"op": "x", "ws": [[S.DB_NAMES.index("meta"), b"next_counter", b""]]}),
        ]
        for rec in bad:
            with pytest.raises(ReplicaError):
                apply_writeset(rmeta, ROOT_VOLUME, 1, rec)
        assert rmeta.seq(ROOT_VOLUME) == 0
        assert records(rmeta) == []
    finally:
        rmeta.close()


def test_two_replicas_identical(primary: Core, tmp_path: Path) -> None:
    workload(primary)
    recs = records(primary.meta)
    stores = [new_replica(tmp_path / f"r{i}", primary)[0] for i in range(2)]
    try:
        for meta in stores:
            replay(meta, recs)
        assert dump(stores[0]) == dump(stores[1])
        assert records(stores[0]) == records(stores[1]) == recs
    finally:
        for meta in stores:
            meta.close()


def test_aborted_update_leaves_no_gap(primary: Core, tmp_path: Path) -> None:
    primary.mkdir("/a")
    with pytest.raises(Exists):
        primary.mkdir("/a")
    before = primary.meta.seq(ROOT_VOLUME)
    with pytest.raises(RuntimeError), primary.meta.write() as txn:
        primary.meta.log(txn, ROOT_VOLUME, "test")
        raise RuntimeError("abort after the sequence was reserved")
    assert primary.meta.seq(ROOT_VOLUME) == before
    primary.mkdir("/b")
    seqs = [s for s, _ in records(primary.meta)]
    assert seqs == list(range(1, len(seqs) + 1))


# --- random workloads -----------------------------------------------------------------------

NAMES = ["a", "b", "c"]
DIRS = ["/", "/a", "/b"]
op_st = st.one_of(
    st.tuples(st.just("mkdir"), st.sampled_from(DIRS), st.sampled_from(NAMES)),
    st.tuples(
        st.just("write"),
        st.sampled_from(DIRS),
        st.sampled_from(NAMES),
        st.integers(0, 140_000),
        st.integers(1, 70_000),
    ),
    st.tuples(
        st.just("truncate"), st.sampled_from(DIRS), st.sampled_from(NAMES), st.integers(0, 140_000)
    ),
    st.tuples(st.just("unlink"), st.sampled_from(DIRS), st.sampled_from(NAMES)),
    st.tuples(
        st.just("rename"),
        st.sampled_from(DIRS),
        st.sampled_from(NAMES),
        st.sampled_from(DIRS),
        st.sampled_from(NAMES),
        st.sampled_from([0, RENAME_EXCHANGE]),
    ),
    st.tuples(
        st.just("link"), st.sampled_from(DIRS), st.sampled_from(NAMES), st.sampled_from(NAMES)
    ),
    st.tuples(st.just("symlink"), st.sampled_from(DIRS), st.sampled_from(NAMES)),
    st.tuples(
        st.just("xattr"), st.sampled_from(DIRS), st.sampled_from(NAMES), st.binary(max_size=50)
    ),
    st.tuples(
        st.just("chmod"), st.sampled_from(DIRS), st.sampled_from(NAMES), st.integers(0, 0o777)
    ),
)


def path(d: str, n: str) -> str:
    return f"{d.rstrip('/')}/{n}"


def do(c: Core, op: tuple[object, ...]) -> None:
    kind = op[0]
    p = path(str(op[1]), str(op[2]))
    if kind == "mkdir":
        c.mkdir(p)
    elif kind == "write":
        off, n = int(op[3]), int(op[4])  # type: ignore[call-overload]
        try:
            fh = c.open(p)
        except FileNotFoundError:
            fh, _ = c.create(p)
        try:
            c.write(fh, off, bytes([off % 251 + 1]) * n)
        finally:
            c.release(fh)
    elif kind == "truncate":
        c.truncate(p, int(op[3]))  # type: ignore[call-overload]
    elif kind == "unlink":
        if c.resolve(p).is_dir:
            c.rmdir(p)
        else:
            c.unlink(p)
    elif kind == "rename":
        c.rename(p, path(str(op[3]), str(op[4])), int(op[5]))  # type: ignore[call-overload]
    elif kind == "link":
        c.link(p, path(str(op[1]), str(op[3])))
    elif kind == "symlink":
        c.symlink(p, b"target")
    elif kind == "xattr":
        c.vfs.setxattr(c.ino(p), b"user.x", bytes(op[3]))  # type: ignore[arg-type]
    elif kind == "chmod":
        run(c.vfs.setattr, c.ino(p), SetAttrs(mode=int(op[3])), c.ctx)  # type: ignore[call-overload]


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(op_st, min_size=1, max_size=25))
def test_random_workloads_replicate(ops: list[tuple[object, ...]]) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        c = new_primary(root / "primary")
        rmeta, rdata = new_replica(root / "replica", c)
        try:
            for op in ops:
                # an op that fails (EEXIST, ENOENT, ...) changes nothing
                with contextlib.suppress(FsError, FileNotFoundError):
                    do(c, op)
            c.settle()
            replay(rmeta, records(c.meta))
            assert_same(c.meta, rmeta)
            copy_data(c, rdata)
            assert check(rmeta, rdata) == []
        finally:
            rmeta.close()
            c.close()
