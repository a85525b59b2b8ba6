"""NodeFs routing without FUSE or network: where a site's reads come from, what crosses volumes.

A "primary" and a "site" are two cores in one process; the site's NodeFs reads the
primary through a LocalReader (what RemoteReader does over RPC). The site's replica
is left behind on purpose (nothing replicates here), so every answer shows whether
it came from the local store or from the primary.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from dfs.check.checker import check
from dfs.cluster.applier import ReplicaApplier
from dfs.cluster.nodefs import NodeFs
from dfs.cluster.remote import LocalReader, Reader
from dfs.cluster.roles import VolumeRoles
from dfs.cluster.volumes import Volume, VolumeTable, encode_mount
from dfs.errors import FsError, NotFound
from dfs.fs.ctx import ROOT_CTX
from dfs.meta.replica import decode_record
from dfs.meta.store import MetaStore
from dfs.net.rpc import Methods, PeerUnavailable
from dfs.types import ROOT_INODE, ROOT_VOLUME, InodeId, NodeId, VolumeId
from tests.core.harness import Core, run
from tests.core.test_replication import Node, serve_ops


class _Down:
    """A Reader whose node does not answer."""

    def __getattr__(self, name: str) -> object:
        async def fail(*args: object) -> object:
            raise PeerUnavailable("p: connection refused")

        return fail


def _site(
    tmp: Path, primary: Core, lease: dict[str, bool], up: dict[str, bool]
) -> tuple[Core, NodeFs]:
    site = Core(tmp / "s", replica=True)
    root = Volume(ROOT_VOLUME, "/", ROOT_INODE, "p", ("p", "s"), ROOT_INODE)

    def reader(node: str) -> Reader:
        assert node == "p"
        return LocalReader(primary.vfs) if up["p"] else _Down()  # type: ignore[return-value]

    async def forward(node: str, op: str, args: list[object], ctx: list[object]) -> object:
        raise AssertionError("no update is made in these tests")

    roles = VolumeRoles("s", site.meta, VolumeTable(site.meta, root))
    roles.leases[ROOT_VOLUME] = _Lease(lease)  # type: ignore[assignment]
    fs = NodeFs(site.vfs, roles, send=forward, reader=reader)
    return site, fs


class _Lease:
    """A site's read lease on the root volume, held while ``held["s"]``."""

    def __init__(self, held: dict[str, bool]) -> None:
        self.held = held

    def current(self) -> bool:
        return self.held["s"]


def test_a_site_without_a_lease_reads_the_primary(tmp_path: Path) -> None:
    primary = Core(tmp_path / "p")
    primary.vfs.mkdir(ROOT_INODE, b"new", 0o755, ROOT_CTX)  # not replicated: the site is behind
    lease = {"s": True}
    up = {"p": True}
    site, fs = _site(tmp_path, primary, lease, up)
    # Holding a lease, the site answers from its replica (which lacks "new").
    with pytest.raises(NotFound):
        run(fs.lookup, ROOT_INODE, b"new")
    # Without one, from the primary: current.
    lease["s"] = False
    a = run(fs.lookup, ROOT_INODE, b"new")
    assert a.is_dir and a.ino == primary.ino("new")
    names = [e.name for e in run(fs.readdir, ROOT_INODE, 0)]
    assert b"new" in names
    assert run(fs.getattr, ROOT_INODE).nlink == 3  # the primary's root: one subdirectory
    # The primary unreachable too: the local replica after all (stale, but an answer).
    up["p"] = False
    assert run(fs.getattr, ROOT_INODE).nlink == 2
    with pytest.raises(NotFound):
        run(fs.lookup, ROOT_INODE, b"new")


def test_mount_points_show_the_volume_root_and_stop_renames(tmp_path: Path) -> None:
    """A volume stored here: its root replaces the mount point; nothing crosses the boundary."""
    core = Core(tmp_path / "n")
    m = core.vfs.mkdir(ROOT_INODE, b"proj", 0o750, ROOT_CTX)
    vol = VolumeId(2)
    core.meta.add_volume(vol, InodeId(0), "/proj")
    vroot = core.vfs.make_volume_root(vol, "/proj", m)
    v = Volume(vol, "/proj", vroot.ino, "n", ("n",), m.ino)
    core.vfs.cover(ROOT_INODE, b"proj", encode_mount(v))
    core.vfs.mkdir(ROOT_INODE, b"other", 0o755, ROOT_CTX)
    root = Volume(ROOT_VOLUME, "/", ROOT_INODE, "n", ("n",), ROOT_INODE)
    fs = NodeFs(core.vfs, VolumeRoles("n", core.meta, VolumeTable(core.meta, root)))

    a = run(fs.lookup, ROOT_INODE, b"proj")
    assert a.ino == vroot.ino and a.volume == vol and a.mode & 0o777 == 0o750
    entries = {e.name: e.attr for e in run(fs.readdir, ROOT_INODE, 0)}
    assert entries[b"proj"].ino == vroot.ino
    f = run(fs.mkdir, vroot.ino, b"inside", 0o755, ROOT_CTX)
    assert f.volume == vol
    other = core.ino("other")
    for call in (
        lambda: fs.rename(vroot.ino, b"inside", other, b"x", 0),
        lambda: fs.rename(other, b"x", vroot.ino, b"y", 0),
        lambda: fs.link(InodeId(f.ino), other, b"l"),
    ):
        with pytest.raises(FsError) as e:
            run(call)
        assert e.value.errno == errno.EXDEV
    for call in (
        lambda: fs.rmdir(ROOT_INODE, b"proj"),
        lambda: fs.rename(ROOT_INODE, b"proj", ROOT_INODE, b"p2", 0),
        lambda: fs.rename(ROOT_INODE, b"other", ROOT_INODE, b"proj", 0),
    ):
        with pytest.raises(FsError) as e:
            run(call)
        assert e.value.errno == errno.EBUSY
    # No name is made in the covered directory (a node whose view of the tree is out of date
    # would lose it there: the sim's seed 307, eager): ESTALE.
    mdir = InodeId(m.ino)
    for call in (
        lambda: core.vfs.mkdir(mdir, b"x", 0o755, ROOT_CTX),
        lambda: core.vfs.create(mdir, b"x", 0o644, os.O_RDWR, ROOT_CTX),
        lambda: core.vfs.symlink(mdir, b"x", b"t", ROOT_CTX),
        lambda: core.vfs.mknod(mdir, b"x", 0o644, 0, ROOT_CTX),
        lambda: core.vfs.rename(ROOT_INODE, b"other", mdir, b"x"),
    ):
        with pytest.raises(FsError) as e:
            call()
        assert e.value.errno == errno.ESTALE
    fa, _ = core.create("/f")
    core.release(fa)
    with pytest.raises(FsError) as e:
        core.vfs.link(core.ino("f"), mdir, b"x")
    assert e.value.errno == errno.ESTALE
    core.unlink("/f")
    assert core.vfs.is_empty_dir(mdir)
    # A second volume cannot cover the same directory, nor a non-empty one.
    with pytest.raises(FsError) as e:
        core.vfs.cover(ROOT_INODE, b"proj", encode_mount(v))
    assert e.value.errno == errno.EBUSY
    core.vfs.mkdir(other, b"child", 0o755, ROOT_CTX)
    with pytest.raises(FsError) as e:
        core.vfs.cover(ROOT_INODE, b"other", encode_mount(v))
    assert e.value.errno == errno.ENOTEMPTY
    # fsck: the volume's root is a top, not a lost directory.
    assert core.findings() == []


def _records(meta: MetaStore, vol: VolumeId) -> list[list[Any]]:
    """The journal of ``vol`` as its primary ships it (no data-file writes here)."""
    return [
        [seq, raw, [None] * len(decode_record(raw).data)] for seq, raw in meta.journal_entries(vol)
    ]


def test_a_site_of_a_new_volume_without_its_root_asks_the_primary(tmp_path: Path) -> None:
    """The sim's seeds 20, 29, 30 (eager): a site that joined a volume while it was created
    knows the mount (it stores the root volume) but its replica lacks the volume's root
    until the primary catches it up; the lookup of the mount point answered ENOENT. It asks
    the volume's primary, and uses the volume through it until its replica has it."""
    primary = Node(tmp_path / "n1", 1)
    site = Node(tmp_path / "n2", 2, replica=True)
    root = Volume(ROOT_VOLUME, "/", ROOT_INODE, "n1", ("n1", "n2"), ROOT_INODE)
    m = primary.vfs.mkdir(ROOT_INODE, b"proj", 0o750, ROOT_CTX)
    vol = VolumeId(2)
    primary.meta.add_volume(vol, InodeId(0), "/proj")
    vroot = primary.vfs.make_volume_root(vol, "/proj", m)
    v = Volume(vol, "/proj", vroot.ino, "n1", ("n1", "n2"), m.ino, ROOT_INODE)
    primary.vfs.cover(ROOT_INODE, b"proj", encode_mount(v))
    site.meta.add_volume(vol, InodeId(0), "/proj")  # vol.join: the root is not known yet
    applier = ReplicaApplier(site.meta, site.data, NodeId(2))
    run(applier.apply, ROOT_VOLUME, _records(primary.meta, ROOT_VOLUME))  # the mount only

    up = {"n1": True}
    methods = Methods()
    serve_ops(
        NodeFs(primary.vfs, VolumeRoles("n1", primary.meta, VolumeTable(primary.meta, root))),
        methods,
    )

    def reader(node: str) -> Reader:
        assert node == "n1"
        return LocalReader(primary.vfs) if up["n1"] else _Down()  # type: ignore[return-value]

    async def forward(node: str, op: str, args: list[Any], ctx: list[Any]) -> Any:
        return await methods._methods["fs.op"].handler("n2", {"op": op, "args": args, "ctx": ctx})

    roles = VolumeRoles("n2", site.meta, VolumeTable(site.meta, root))
    roles.leases[ROOT_VOLUME] = _Lease({"s": True})  # type: ignore[assignment]
    fs = NodeFs(site.vfs, roles, send=forward, reader=reader)

    a = run(fs.lookup, ROOT_INODE, b"proj")
    assert (a.ino, a.volume, a.mode & 0o777) == (vroot.ino, vol, 0o750)
    assert run(fs.getattr, vroot.ino).ino == vroot.ino
    dh = fs.opendir(vroot.ino)
    assert [e.name for e in run(fs.readdir, fs.dir_of_handle(dh), 0)] == [b".", b".."]
    fs.releasedir(dh)
    fh, f = run(fs.create, vroot.ino, b"f", 0o644, os.O_RDWR, ROOT_CTX)
    assert run(fs.write, fh, 0, b"data") == 4
    run(fs.fsync, fh, False)
    run(fs.release, fh)
    assert run(fs.lookup, vroot.ino, b"f").size == 4
    # Its primary unreachable: an error, not ENOENT from a replica without the volume.
    up["n1"] = False
    with pytest.raises(FsError) as e:
        run(fs.lookup, ROOT_INODE, b"proj")
    assert e.value.errno == errno.EHOSTDOWN
    fs.forget([(vroot.ino, 3), (f.ino, 2)])
    assert not fs.handles.learnt


def test_a_site_records_the_root_of_a_volume_it_joined(tmp_path: Path) -> None:
    """A site that does not store the root volume (so has no mount records) joined a volume
    before its root existed, and kept root 0 in its ``volumes`` record: the checker found the
    volume's root directory unreachable. The record gets the root when the site learns it
    (``ClusterService._adopt``, also at every start, so old stores are repaired)."""
    primary = Node(tmp_path / "n1", 1)
    site = Node(tmp_path / "n2", 2, replica=True)
    m = primary.vfs.mkdir(ROOT_INODE, b"proj", 0o750, ROOT_CTX)
    vol = VolumeId(2)
    primary.meta.add_volume(vol, InodeId(0), "/proj")
    vroot = primary.vfs.make_volume_root(vol, "/proj", m)
    primary.vfs.mkdir(vroot.ino, b"d", 0o755, ROOT_CTX)
    site.meta.add_volume(vol, InodeId(0), "/proj")  # vol.join
    run(ReplicaApplier(site.meta, site.data, NodeId(2)).apply, vol, _records(primary.meta, vol))
    assert [(x.code, x.ino) for x in check(site.meta, site.data)] == [("unreachable", vroot.ino)]
    site.meta.add_volume(vol, vroot.ino, "/proj")
    assert check(site.meta, site.data) == []
    assert site.meta.stored_volumes()[vol] == {"root": vroot.ino, "path": "/proj"}
    site.meta.add_volume(vol, InodeId(12345), "/proj")  # a record with its root is kept
    assert site.meta.stored_volumes()[vol]["root"] == vroot.ino
