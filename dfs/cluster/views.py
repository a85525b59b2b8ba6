"""Per-host views (after the Newcastle Connection): ``MOUNT/.../HOST/path`` is path as HOST has it.

The directory ``...`` (``VIEW_DIR_NAME``) in the mount's root lists one
directory per host; below ``HOST`` every lookup, getattr, readdir and read is
answered by that host's ``Reader`` (``dfs.cluster.remote``: RPC to the host,
or the local store for this node). ``HostViews`` holds the in-memory
inode table of the views; the FUSE layer routes every request on an inode for
which ``is_view`` is true here (it answers ``lookup(ROOT, VIEW_DIR_NAME)``
with ``dots_attr()`` itself, and keeps ``...`` out of the root's readdir).

View inode numbers. The kernel must never confuse a view inode with a real
one, so view inodes are synthetic, allocated here and never stored. They are
the numbers 2 .. 2**48-1, i.e. NodeId field 0: ``dfs.types.make_inode_id``
refuses node id 0 (and the configuration only allows 1..65535), so every
real inode is the root (1) or at least 2**48, and the two ranges cannot meet
whatever node ids a cluster uses. (Bit 63 would not do: node ids from 0x8000
up set it.) Within the range:

* 2 is ``...`` itself (``DOTS_INODE``);
* 3 .. 3+N-1 are the N host directories, in sorted host order, fixed for the
  life of the object: host H's directory *is* H's root inode seen through the
  view, so (H, ROOT) always maps to it;
* the rest are handed out in increasing order, never reused (2**48 numbers
  outlast any mount), for (host, real inode) pairs.

The table (host, real inode) <-> view inode is bounded the way the kernel's
own references are: ``lookup`` counts one reference, readdir entries count
one when the FUSE layer reports them accepted with ``remember`` (as for
``Vfs``, not for "." and ".."), and ``forget`` takes references back; an entry
with none is dropped. Entries handed out by ``readdir`` that the kernel never
accepted wait in a FIFO of at most ``MAX_UNCONFIRMED`` (or one batch, if
larger) and are dropped oldest first, from the next readdir on; so the FUSE
layer must call ``remember`` for the entries of one ``readdir`` before it
awaits anything else of this object. The same real inode of the
same host keeps the same view inode while the kernel holds it.

A host that stores no replica of the root volume (a cluster with more nodes
than root replicas) still shows the volumes it stores, at their paths: with
``stored`` given, its directory and the directories on the way to each such
volume are synthetic (0555, root's; their names are the components of the
volumes' paths), and each volume's name shows the host's replica of it.
Writes below a synthetic directory other than the host's own are refused (EPERM).

Attributes answered through a view are the host's, with ``ino`` replaced by
the view inode (``parent`` stays the host's real number; the kernel never sees
it). A host that does not answer still has its directory, with synthetic
attributes (0555, root's), so ``ls MOUNT/...`` lists it; operations below it
fail with the reader's errno (EHOSTDOWN, ETIMEDOUT) within the peer's call
deadline. ``...`` looks read-only (0555, root's) and refuses writes (EPERM
from ``real``); ``real(ino)`` gives the (host, real inode) on which the FUSE
layer carries out a write made through a view.
"""

from __future__ import annotations

import errno
import logging
import stat
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import trio

from dfs.clock import WallClock, system_time_ns
from dfs.cluster.remote import Reader
from dfs.errors import FsError, Invalid, IsADir, NameTooLong, NoData, NotFound
from dfs.fs.vfs import DirEntry
from dfs.meta import schema as S
from dfs.types import NODE_SHIFT, ROOT_INODE, Attr, InodeId, VolumeId

log = logging.getLogger(__name__)

VIEW_DIR_NAME = b"..."
DOTS_INODE = InodeId(2)
FIRST_HOST_INODE = 3
VIEW_INODE_END = 1 << NODE_SHIFT  # first number that is not a view inode
MAX_UNCONFIRMED = 4096  # readdir entries awaiting ``remember``: a few batches' worth
DOTS_MODE = stat.S_IFDIR | 0o555


@dataclass(slots=True)
class _Mapped:
    host: str
    real: InodeId
    volume: VolumeId
    refs: int = 0


@dataclass(frozen=True, slots=True)
class ViewStatistics:
    mapped: int  # table entries (host directories and ``...`` are not in the table)
    unconfirmed: int  # of which readdir entries not (yet) accepted by the kernel
    allocated: int  # view inode numbers handed out so far


def is_view(ino: int) -> bool:
    """Whether ``ino`` lies in the view range (it may still be stale: then ESTALE)."""
    return DOTS_INODE <= ino < VIEW_INODE_END


class HostViews:
    """The ``...`` directory and the views of every host below it.

    ``hosts`` maps host (node) names to their readers. ``root``, if given,
    returns the attributes of the mount's root, for the ".." of ``...``
    (without it ``...`` lists no "..", and looking it up is ENOENT).
    ``stored(host)``, if given: None when the host stores the root volume,
    else the (path, root directory) of every other volume it stores.
    """

    def __init__(
        self,
        hosts: Mapping[str, Reader],
        *,
        root: Callable[[], Attr] | None = None,
        stored: Callable[[str], list[tuple[str, InodeId]] | None] | None = None,
        clock: WallClock = system_time_ns,
    ) -> None:
        names = sorted(hosts)
        if FIRST_HOST_INODE + len(names) >= VIEW_INODE_END:
            raise ValueError("too many hosts")
        for name in names:
            raw = name.encode()
            if not raw or len(raw) > S.MAX_NAME or b"/" in raw or b"\0" in raw:
                raise ValueError(f"host name {name!r} cannot be a directory name")
            if raw in (b".", b"..", VIEW_DIR_NAME):
                raise ValueError(f"host name {name!r} cannot be a directory name")
        self._readers: dict[str, Reader] = dict(hosts)
        self._root = root
        self._host_ino = {h: InodeId(FIRST_HOST_INODE + i) for i, h in enumerate(names)}
        self._ino_host = {ino: h for h, ino in self._host_ino.items()}
        self._by_name = {h.encode(): h for h in names}
        self._next = FIRST_HOST_INODE + len(names)
        self._by_view: dict[InodeId, _Mapped] = {}
        self._by_real: dict[tuple[str, InodeId], InodeId] = {}
        self._unconfirmed: OrderedDict[InodeId, None] = OrderedDict()
        self._volumes: dict[InodeId, list[int]] = {}  # real inode -> [volume, mappings]
        now = clock()
        self._dots = Attr(DOTS_INODE, DOTS_MODE, 0, 0, 2 + len(names), 0, now, now, now, now)
        self._stored = stored
        # Synthetic directories of hosts without the root volume: (host, path) <-> a number
        # standing for a real inode, below 2**48 like view inodes, so never a real one.
        self._skel_ids: dict[tuple[str, tuple[bytes, ...]], InodeId] = {}
        self._skel_paths: dict[tuple[str, InodeId], tuple[bytes, ...]] = {}

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(self._host_ino)

    is_view = staticmethod(is_view)

    def statistics(self) -> ViewStatistics:
        return ViewStatistics(
            mapped=len(self._by_view),
            unconfirmed=len(self._unconfirmed),
            allocated=self._next - FIRST_HOST_INODE - len(self._host_ino),
        )

    def dots_attr(self) -> Attr:
        """The attributes of ``...`` (a 0555 directory owned by root)."""
        return replace(self._dots)

    def host_inode(self, host: str) -> InodeId:
        """The view inode of ``MOUNT/.../host``."""
        return self._host_ino[host]

    # --- the table ------------------------------------------------------------------------

    def real(self, ino: InodeId) -> tuple[str, InodeId]:
        """The (host, real inode) that view inode ``ino`` shows, for writes through a view.

        EPERM for ``...`` itself (nothing can be written there), ESTALE for a
        number this table does not hold (forgotten, or never handed out).
        """
        host, real = self._mapped(ino)
        if (host, real) in self._skel_paths:
            raise FsError(errno.EPERM, f"{host} stores no replica of this directory")
        return host, real

    def _mapped(self, ino: InodeId) -> tuple[str, InodeId]:
        if ino == DOTS_INODE:
            raise FsError(errno.EPERM, f"{VIEW_DIR_NAME.decode()} cannot be changed")
        host = self._ino_host.get(ino)
        if host is not None:
            return host, ROOT_INODE
        m = self._by_view.get(ino)
        if m is None:
            raise FsError(errno.ESTALE, f"no view inode {ino:#x}")
        return m.host, m.real

    # --- hosts without the root volume -----------------------------------------------------

    def _skeleton(self, host: str) -> dict[tuple[bytes, ...], InodeId | None] | None:
        """None if ``host`` stores the root volume; else every path (as components) leading
        to a volume it stores: the volume's root directory, or None on the way there."""
        vols = self._stored(host) if self._stored is not None else None
        if vols is None:
            return None
        tree: dict[tuple[bytes, ...], InodeId | None] = {(): None}
        for path, root in vols:
            comps = tuple(c.encode() for c in path.split("/") if c)
            if not comps:
                continue
            for i in range(1, len(comps)):
                tree.setdefault(comps[:i], None)
            tree[comps] = root
        return tree

    def _skel_path(self, host: str, real: InodeId) -> tuple[bytes, ...] | None:
        """The path of a synthetic directory of ``host``, or None for a stored inode."""
        if real == ROOT_INODE:
            return () if self._skeleton(host) is not None else None
        return self._skel_paths.get((host, real))

    def _skel_dir(
        self, host: str, real: InodeId
    ) -> tuple[tuple[bytes, ...], dict[tuple[bytes, ...], InodeId | None]] | None:
        """``_skel_path`` and the host's ``_skeleton``, built once, for a synthetic directory."""
        if real != ROOT_INODE and (host, real) not in self._skel_paths:
            return None
        tree = self._skeleton(host)
        if tree is None:
            return None
        return (() if real == ROOT_INODE else self._skel_paths[host, real]), tree

    def _skel_attr(self, host: str, path: tuple[bytes, ...]) -> Attr:
        if not path:
            return replace(self._dots, ino=ROOT_INODE, nlink=2)
        key = (host, path)
        real = self._skel_ids.get(key)
        if real is None:
            if self._next >= VIEW_INODE_END:
                raise FsError(errno.ENFILE, "per-host view inode numbers are exhausted")
            real = InodeId(self._next)  # from the view range: never a real inode
            self._next += 1
            self._skel_ids[key] = real
            self._skel_paths[key[0], real] = path
        return replace(self._dots, ino=real, nlink=2)

    async def _skel_entry(
        self, host: str, tree: dict[tuple[bytes, ...], InodeId | None], path: tuple[bytes, ...]
    ) -> Attr:
        root = tree[path]
        if root is None:
            return self._skel_attr(host, path)
        return await self._readers[host].getattr(root)

    def _reader(self, ino: InodeId) -> tuple[str, Reader, InodeId]:
        host, real = self._mapped(ino)
        return host, self._readers[host], real

    def _attach(self, host: str, a: Attr, *, counted: bool) -> Attr:
        """``a`` (host's attributes) with its view inode, mapping it if new."""
        if a.ino == ROOT_INODE:
            return replace(a, ino=self._host_ino[host])
        key = (host, a.ino)
        view = self._by_real.get(key)
        if view is None:
            if self._next >= VIEW_INODE_END:
                raise FsError(errno.ENFILE, "per-host view inode numbers are exhausted")
            view = InodeId(self._next)
            self._next += 1
            self._by_view[view] = _Mapped(host, a.ino, a.volume)
            self._by_real[key] = view
            got = self._volumes.setdefault(a.ino, [a.volume, 0])
            got[1] += 1
        m = self._by_view[view]
        if counted:
            m.refs += 1
            self._unconfirmed.pop(view, None)
        elif m.refs == 0:
            self._unconfirmed[view] = None
            self._unconfirmed.move_to_end(view)
        return replace(a, ino=view)

    def _prune(self, keep: int) -> None:
        """Unmap the oldest unconfirmed entries past the bound, never the newest ``keep``."""
        while len(self._unconfirmed) > max(MAX_UNCONFIRMED, keep):
            old, _ = self._unconfirmed.popitem(last=False)
            if self._by_view[old].refs == 0:
                self._drop(old)

    def _drop(self, view: InodeId) -> None:
        m = self._by_view.pop(view)
        del self._by_real[(m.host, m.real)]
        self._unconfirmed.pop(view, None)
        got = self._volumes.get(m.real)
        if got is not None:
            got[1] -= 1
            if got[1] <= 0:
                del self._volumes[m.real]

    def volume_of(self, real: InodeId) -> VolumeId | None:
        """The volume of a real inode the views show (a write through a view names it, and
        the node may store no replica of its volume to look it up in)."""
        got = self._volumes.get(real)
        return VolumeId(got[0]) if got is not None else None

    def remember(self, ino: InodeId) -> None:
        """The kernel accepted a readdir entry (not "." or ".."): count one reference."""
        if ino == DOTS_INODE or ino in self._ino_host:
            return
        m = self._by_view.get(ino)
        if m is None:
            log.warning("view inode %#x accepted by the kernel but no longer mapped", ino)
            return
        m.refs += 1
        self._unconfirmed.pop(ino, None)

    def forget(self, items: list[tuple[InodeId, int]]) -> None:
        """The kernel dropped ``n`` references to each ``ino``; unmapped at zero."""
        for ino, n in items:
            m = self._by_view.get(ino)
            if m is None:
                continue  # ``...``, a host directory, or already gone
            m.refs -= n
            if m.refs <= 0:
                self._drop(ino)

    # --- host directories -----------------------------------------------------------------

    async def _host_attr(self, host: str) -> Attr:
        """Host's root through the view; synthetic if the host cannot say."""
        if self._skeleton(host) is not None:
            return replace(self._dots, ino=self._host_ino[host], nlink=2)
        try:
            a = await self._readers[host].getattr(ROOT_INODE)
        except FsError as exc:
            log.debug("view of %s: root unavailable (%s); showing a placeholder", host, exc)
            return replace(self._dots, ino=self._host_ino[host], nlink=2)
        return replace(a, ino=self._host_ino[host])

    async def _host_attrs(self, hosts: list[str]) -> dict[str, Attr]:
        """``_host_attr`` of several hosts at once, so one slow host costs one deadline."""
        out: dict[str, Attr] = {}

        async def one(h: str) -> None:
            out[h] = await self._host_attr(h)

        async with trio.open_nursery() as nursery:
            for h in hosts:
                nursery.start_soon(one, h)
        return out

    # --- reading --------------------------------------------------------------------------

    async def lookup(self, parent: InodeId, name: bytes) -> Attr:
        """``name`` in view directory ``parent``, counting one reference; ENOENT if absent."""
        if len(name) > S.MAX_NAME:
            raise NameTooLong()
        if parent == DOTS_INODE:
            if name == b".":
                return self.dots_attr()
            if name == b"..":
                if self._root is None:
                    raise NotFound()
                return self._root()
            host = self._by_name.get(name)
            if host is None:
                raise NotFound()
            return await self._host_attr(host)
        host, reader, real = self._reader(parent)
        if real == ROOT_INODE and name == b"..":
            return self.dots_attr()
        skel = self._skel_dir(host, real)
        if skel is not None:
            path, tree = skel
            child = (*path, name)
            if child not in tree:
                raise NotFound()
            return self._attach(host, await self._skel_entry(host, tree, child), counted=True)
        a = await reader.lookup(real, name)
        if a is None:
            raise NotFound()
        return self._attach(host, a, counted=True)

    async def getattr(self, ino: InodeId) -> Attr:
        if ino == DOTS_INODE:
            return self.dots_attr()
        host = self._ino_host.get(ino)
        if host is not None:
            return await self._host_attr(host)
        host, reader, real = self._reader(ino)
        path = self._skel_path(host, real)
        if path is not None:
            return replace(self._skel_attr(host, path), ino=ino)
        return replace(await reader.getattr(real), ino=ino)

    async def readdir(self, ino: InodeId, start: int = 0) -> list[DirEntry]:
        """The next entries of view directory ``ino`` after cookie ``start``; [] at the end.

        For ``...``: ".", ".." (if ``root`` was given) and the hosts, with
        cookies 1, 2 and FIRST_COOKIE + the host's index in sorted order. For
        a host's directory: the host's entries with their cookies, inodes
        mapped (see ``remember``).
        """
        if ino == DOTS_INODE:
            return await self._readdir_dots(start)
        host, reader, real = self._reader(ino)
        skel = self._skel_dir(host, real)
        if skel is not None:
            return await self._readdir_skeleton(ino, host, *skel, start)
        out: list[DirEntry] = []
        for e in await reader.readdir(real, start):
            if e.name == b".":
                a = replace(e.attr, ino=ino)
            elif e.name == b".." and real == ROOT_INODE:
                a = self.dots_attr()
            else:
                a = self._attach(host, e.attr, counted=False)
            out.append(DirEntry(e.name, a, e.cookie))
        self._prune(keep=len(out))  # this batch must survive until the FUSE layer remembers it
        return out

    async def _readdir_skeleton(
        self,
        ino: InodeId,
        host: str,
        path: tuple[bytes, ...],
        tree: dict[tuple[bytes, ...], InodeId | None],
        start: int,
    ) -> list[DirEntry]:
        out: list[DirEntry] = []
        if start < 1:
            out.append(DirEntry(b".", await self.getattr(ino), 1))
        if start < 2:
            if not path:
                parent = self.dots_attr()
            elif len(path) == 1:
                parent = await self._host_attr(host)
            else:
                parent = self._attach(host, self._skel_attr(host, path[:-1]), counted=False)
            out.append(DirEntry(b"..", parent, 2))
        depth = len(path)
        names = sorted({p[depth] for p in tree if len(p) > depth and p[:depth] == path})
        for i, name in enumerate(names):
            cookie = S.FIRST_COOKIE + i
            if cookie > start:
                a = await self._skel_entry(host, tree, (*path, name))
                out.append(DirEntry(name, self._attach(host, a, counted=False), cookie))
        self._prune(keep=len(out))
        return out

    async def _readdir_dots(self, start: int) -> list[DirEntry]:
        out: list[DirEntry] = []
        if start < 1:
            out.append(DirEntry(b".", self.dots_attr(), 1))
        if start < 2 and self._root is not None:
            out.append(DirEntry(b"..", self._root(), 2))
        first = S.FIRST_COOKIE
        wanted = {h: first + i for i, h in enumerate(self._host_ino) if first + i > start}
        attrs = await self._host_attrs(list(wanted))
        out += [DirEntry(h.encode(), attrs[h], cookie) for h, cookie in wanted.items()]
        return out

    async def read(self, ino: InodeId, off: int, size: int) -> bytes:
        if ino == DOTS_INODE:
            raise IsADir()
        host, reader, real = self._reader(ino)
        if self._skel_path(host, real) is not None:
            raise IsADir()
        return await reader.read(real, off, size)

    async def readlink(self, ino: InodeId) -> bytes:
        if ino == DOTS_INODE:
            raise Invalid()
        host, reader, real = self._reader(ino)
        if self._skel_path(host, real) is not None:
            raise Invalid()
        return await reader.readlink(real)

    async def getxattr(self, ino: InodeId, name: bytes) -> bytes:
        if ino == DOTS_INODE:
            raise NoData()
        host, reader, real = self._reader(ino)
        if self._skel_path(host, real) is not None:
            raise NoData()
        return await reader.getxattr(real, name)

    async def listxattr(self, ino: InodeId) -> list[bytes]:
        if ino == DOTS_INODE:
            return []
        host, reader, real = self._reader(ino)
        if self._skel_path(host, real) is not None:
            return []
        return await reader.listxattr(real)
