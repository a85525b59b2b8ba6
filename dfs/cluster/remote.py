"""Reading a node's replica from another node: the read-only RPC methods and their callers.

Serving side: ``register_read_methods(methods, vfs)`` adds the ``r.*`` methods,
which answer from this node's local store and never change it: no lookup
counts (``Vfs.peek``, not ``Vfs.lookup``), no atime, no handles left open::

    r.lookup    {parent: int, name: bytes <= 255}           -> attr or None
    r.getattr   {ino: int}                                  -> attr
    r.readdir   {ino: int, start: int, limit: 1..1024}      -> [[name, attr, cookie], ...]
    r.read      {ino: int, off: int, size: 0..4 MiB}        -> bytes
    r.readlink  {ino: int}                                  -> bytes
    r.getxattr  {ino: int, name: bytes <= 255}              -> bytes
    r.listxattr {ino: int}                                  -> [name, ...]

An *attr* on the wire is ``[ino, dfs.meta.schema.pack_inode(attr)]`` (``pack_attr``).
Arguments failing the schema, and integers out of range (an inode number that
is not a u64, a negative offset or cookie), are EINVAL; failures of the store
travel as their errno (``FsError``). ``r.readdir`` returns at most ``limit``
entries after cookie ``start`` ("." and ".." first, as ``Vfs.readdir``); an
empty list is the end. File data is read through a read-only ``FileIO``
handle that is released at once; an unlinked inode that nobody on this node
holds is answered ENOENT instead, since releasing the last handle on it
would purge it (a write).

Calling side: ``RemoteReader`` (over a ``dfs.net.peer.Peer``, or anything with
its ``call``) and ``LocalReader`` (over this node's ``Vfs``, so that a view of
one's own host needs no RPC) offer the same async ``Reader`` interface and
return core types (``Attr``, ``DirEntry``). Every answer from the network is
checked before use: an ill-formed one (wrong type, a size over the method's
cap, an inode number no node can allocate, cookies that do not advance) is
``FsError(EIO)``, never an exception of another kind. Peer failures arrive as
the ``FsError`` subclasses of ``dfs.net.rpc`` (EHOSTDOWN, ETIMEDOUT, or the
remote errno), within the peer's call deadline.
"""

from __future__ import annotations

import errno
import math
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import trio

from dfs.cluster.deadline import left
from dfs.errors import FsError, Invalid, NameTooLong, NotFound
from dfs.fs.vfs import DirEntry, Vfs
from dfs.meta import schema as S
from dfs.net.frames import Field
from dfs.net.rpc import Methods, PeerTimeout
from dfs.types import COUNTER_MASK, MAX_NODE_ID, NODE_SHIFT, ROOT_INODE, Attr, InodeId

MAX_READ = 4 << 20  # bytes per r.read; a frame (16 MiB) holds it with room to spare
MAX_READDIR = 1024  # entries per r.readdir; 1024 * (255-byte name + attr) is < 0.5 MiB
READDIR_LIMIT = 256  # entries a reader asks for per call
MAX_U64 = (1 << 64) - 1
MAX_OFFSET = (1 << 63) - 1  # off_t

LOOKUP = "r.lookup"
GETATTR = "r.getattr"
READDIR = "r.readdir"
READ = "r.read"
READLINK = "r.readlink"
GETXATTR = "r.getxattr"
LISTXATTR = "r.listxattr"


def is_stored_inode(ino: object) -> bool:
    """Whether ``ino`` is a number some node can allocate (see ``dfs.types``).

    The root (1), or a NodeId 1..MAX_NODE_ID in the high 16 bits with a
    non-zero counter. Per-host view inodes (``dfs.cluster.views``) lie outside.
    """
    if not isinstance(ino, int) or isinstance(ino, bool):
        return False
    if ino == ROOT_INODE:
        return True
    return 0 < ino >> NODE_SHIFT <= MAX_NODE_ID and ino & COUNTER_MASK != 0


def _bad(what: str) -> FsError:
    return FsError(errno.EIO, f"ill-formed answer: {what}")


def pack_attr(a: Attr) -> list[Any]:
    """An attribute record for the wire: ``[ino, packed inode]``."""
    return [int(a.ino), S.pack_inode(a)]


def unpack_attr(raw: object) -> Attr:
    """The ``Attr`` in a wire record; ``FsError(EIO)`` if it is ill-formed."""
    if not isinstance(raw, list | tuple) or len(raw) != 2:
        raise _bad("attr is not [ino, inode]")
    ino, packed = raw
    if not is_stored_inode(ino):
        raise _bad(f"attr of inode {ino!r}, which no node allocates")
    if not isinstance(packed, bytes):
        raise _bad("packed inode is not bytes")
    try:
        return S.unpack_inode(ino, packed)
    except struct.error:
        raise _bad(f"packed inode of {len(packed)} bytes") from None


# --- serving side ----------------------------------------------------------------------------


def _u64(args: Mapping[str, Any], key: str, low: int = 0, high: int = MAX_U64) -> int:
    v: int = args[key]
    if not low <= v <= high:
        raise Invalid(message=f"{key}: {v} out of range {low}..{high}")
    return v


def _ino(args: Mapping[str, Any], key: str = "ino") -> InodeId:
    return InodeId(_u64(args, key, 1))


async def read_local(vfs: Vfs, ino: InodeId, off: int, size: int) -> bytes:
    """``size`` bytes of ``ino`` at ``off`` from this node's store, without a kernel handle."""
    if size == 0 or off > MAX_OFFSET:
        vfs.getattr(ino)  # ENOENT for a missing inode, as a real read would
        return b""
    a = vfs.getattr(ino)
    if a.nlink == 0 and ino not in vfs.lookups and not vfs.files.is_open(ino):
        # An orphan nobody here holds: the last release would purge it.
        raise NotFound(message=f"inode {ino:#x} is unlinked")
    fh = vfs.files.open(ino, os.O_RDONLY, a)
    try:
        return await vfs.files.read(fh, off, size)
    finally:
        with trio.CancelScope(shield=True):  # the handle must not leak
            await vfs.files.release(fh)


def stored_entries(vfs: Vfs, ino: InodeId, start: int) -> Iterator[DirEntry]:
    """``vfs.readdir`` as this node stores the tree: a mount point shows its volume's
    root, and is left out where this node stores no replica of the volume."""
    for e in vfs.readdir(ino, start):
        if e.name in (b".", b".."):
            yield e
            continue
        a = vfs.as_stored(e.attr)
        if a is not None:
            yield e if a is e.attr else DirEntry(e.name, a, e.cookie)


def register_read_methods(methods: Methods, vfs: Vfs) -> None:
    """Offer this node's store to other nodes for reading (the ``r.*`` methods above)."""

    async def lookup(peer: str, args: dict[str, Any]) -> list[Any] | None:
        a = vfs.peek(_ino(args, "parent"), args["name"])
        if a is not None and not args.get("raw"):
            a = vfs.as_stored(a)
        return None if a is None else pack_attr(a)

    async def getattr_(peer: str, args: dict[str, Any]) -> list[Any]:
        return pack_attr(vfs.getattr(_ino(args)))

    async def readdir(peer: str, args: dict[str, Any]) -> list[list[Any]]:
        ino = _ino(args)
        start = _u64(args, "start")
        limit = _u64(args, "limit", 1, MAX_READDIR)
        out: list[list[Any]] = []
        entries = vfs.readdir(ino, start) if args.get("raw") else stored_entries(vfs, ino, start)
        for e in entries:
            out.append([e.name, pack_attr(e.attr), e.cookie])
            if len(out) >= limit:
                break
        return out

    async def read(peer: str, args: dict[str, Any]) -> bytes:
        off = _u64(args, "off", 0, MAX_OFFSET)
        size = _u64(args, "size", 0, MAX_READ)
        return await read_local(vfs, _ino(args), off, size)

    async def readlink(peer: str, args: dict[str, Any]) -> bytes:
        return vfs.readlink(_ino(args))

    async def getxattr(peer: str, args: dict[str, Any]) -> bytes:
        return vfs.getxattr(_ino(args), args["name"])

    async def listxattr(peer: str, args: dict[str, Any]) -> list[bytes]:
        return vfs.listxattr(_ino(args))

    ino = Field(int)
    name = Field(bytes, max_len=S.MAX_NAME)
    raw = Field(bool, optional=True)
    methods.add(LOOKUP, {"parent": ino, "name": name, "raw": raw}, lookup)
    methods.add(GETATTR, {"ino": ino}, getattr_)
    methods.add(
        READDIR, {"ino": ino, "start": Field(int), "limit": Field(int), "raw": raw}, readdir
    )
    methods.add(READ, {"ino": ino, "off": Field(int), "size": Field(int)}, read)
    methods.add(READLINK, {"ino": ino}, readlink)
    methods.add(GETXATTR, {"ino": ino, "name": Field(bytes, max_len=S.MAX_XATTR_NAME)}, getxattr)
    methods.add(LISTXATTR, {"ino": ino}, listxattr)


# --- calling side ----------------------------------------------------------------------------


class Reader(Protocol):
    """Read access to one host's replica; every method may raise ``FsError``."""

    async def lookup(self, parent: InodeId, name: bytes) -> Attr | None:
        """The entry's attributes, None if ``parent`` has no such entry."""
        ...

    async def getattr(self, ino: InodeId) -> Attr: ...

    async def readdir(self, ino: InodeId, start: int = 0) -> list[DirEntry]:
        """The next entries after cookie ``start`` (one batch); an empty list is the end."""
        ...

    async def read(self, ino: InodeId, off: int, size: int) -> bytes: ...

    async def readlink(self, ino: InodeId) -> bytes: ...

    async def getxattr(self, ino: InodeId, name: bytes) -> bytes: ...

    async def listxattr(self, ino: InodeId) -> list[bytes]: ...


class Caller(Protocol):
    """What ``RemoteReader`` needs of a ``dfs.net.peer.Peer``."""

    async def call(
        self,
        method: str,
        args: Mapping[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - as Peer.call
    ) -> Any: ...


def _check_name(name: bytes, limit: int, err: int) -> None:
    """Refuse locally what the remote schema would refuse, with the errno a local call gives."""
    if len(name) > limit:
        raise FsError(err)


class RemoteReader:
    """A ``Reader`` over one peer's ``r.*`` methods; ``timeout`` overrides its call deadline."""

    def __init__(
        self,
        peer: Caller,
        *,
        timeout: float | None = None,
        readdir_limit: int = READDIR_LIMIT,
        raw: bool = False,
    ) -> None:
        if not 1 <= readdir_limit <= MAX_READDIR:
            raise ValueError(f"readdir_limit must be 1..{MAX_READDIR}")
        self.peer = peer
        # raw: the tree as stored, mount points as they are (NodeFs crosses them itself);
        # else as a host view shows it (see ``stored_entries``).
        self._raw = {"raw": True} if raw else {}
        self.timeout = timeout
        self.readdir_limit = readdir_limit

    async def _call(self, method: str, **args: Any) -> Any:
        # Within the deadline of the client call being served, if any (dfs.cluster.deadline).
        limit = left(math.inf if self.timeout is None else self.timeout)
        if limit <= 0:
            raise PeerTimeout(f"{method}: the call's deadline has passed")
        return await self.peer.call(method, args, timeout=None if limit == math.inf else limit)

    async def lookup(self, parent: InodeId, name: bytes) -> Attr | None:
        _check_name(name, S.MAX_NAME, errno.ENAMETOOLONG)
        raw = await self._call(LOOKUP, parent=int(parent), name=name, **self._raw)
        return None if raw is None else unpack_attr(raw)

    async def getattr(self, ino: InodeId) -> Attr:
        a = unpack_attr(await self._call(GETATTR, ino=int(ino)))
        if a.ino != ino:
            raise _bad(f"getattr of {ino:#x} answered inode {a.ino:#x}")
        return a

    async def readdir(self, ino: InodeId, start: int = 0) -> list[DirEntry]:
        raw = await self._call(
            READDIR, ino=int(ino), start=start, limit=self.readdir_limit, **self._raw
        )
        if not isinstance(raw, list) or len(raw) > self.readdir_limit:
            raise _bad("readdir result is not a list of at most the asked-for size")
        out: list[DirEntry] = []
        last = start
        for item in raw:
            if not isinstance(item, list) or len(item) != 3:
                raise _bad("readdir entry is not [name, attr, cookie]")
            name, attr, cookie = item
            if not isinstance(name, bytes) or not 0 < len(name) <= S.MAX_NAME:
                raise _bad(f"readdir entry name {name!r}")
            if b"/" in name or b"\0" in name:
                raise _bad(f"readdir entry name {name!r}")
            # Cookies must advance, or a caller resuming from them could loop forever.
            if isinstance(cookie, bool) or not isinstance(cookie, int) or not last < cookie:
                raise _bad(f"readdir cookie {cookie!r} after {last}")
            last = cookie
            out.append(DirEntry(name, unpack_attr(attr), cookie))
        return out

    async def read(self, ino: InodeId, off: int, size: int) -> bytes:
        if off < 0 or size < 0:
            raise Invalid()
        parts: list[bytes] = []
        while size > 0:
            n = min(size, MAX_READ)
            data = await self._call(READ, ino=int(ino), off=off, size=n)
            if not isinstance(data, bytes) or len(data) > n:
                raise _bad(f"read of {n} bytes answered {type(data).__name__}")
            parts.append(data)
            if len(data) < n:
                break  # end of file
            off += n
            size -= n
        return b"".join(parts)

    async def readlink(self, ino: InodeId) -> bytes:
        target = await self._call(READLINK, ino=int(ino))
        if not isinstance(target, bytes) or not 0 < len(target) <= S.MAX_SYMLINK:
            raise _bad("symlink target")
        return target

    async def getxattr(self, ino: InodeId, name: bytes) -> bytes:
        _check_name(name, S.MAX_XATTR_NAME, errno.ERANGE)
        value = await self._call(GETXATTR, ino=int(ino), name=name)
        if not isinstance(value, bytes) or len(value) > S.MAX_XATTR_VALUE:
            raise _bad("extended attribute value")
        return value

    async def listxattr(self, ino: InodeId) -> list[bytes]:
        names = await self._call(LISTXATTR, ino=int(ino))
        if not isinstance(names, list) or not all(
            isinstance(n, bytes) and 0 < len(n) <= S.MAX_XATTR_NAME for n in names
        ):
            raise _bad("extended attribute names")
        return names


class LocalReader:
    """A ``Reader`` over this node's own ``Vfs``: the same answers as ``r.*``, without RPC."""

    def __init__(self, vfs: Vfs, *, readdir_limit: int = READDIR_LIMIT) -> None:
        if readdir_limit < 1:
            raise ValueError("readdir_limit must be positive")
        self.vfs = vfs
        self.readdir_limit = readdir_limit

    async def lookup(self, parent: InodeId, name: bytes) -> Attr | None:
        if len(name) > S.MAX_NAME:
            raise NameTooLong()
        a = self.vfs.peek(parent, name)
        return None if a is None else self.vfs.as_stored(a)

    async def getattr(self, ino: InodeId) -> Attr:
        return self.vfs.getattr(ino)

    async def readdir(self, ino: InodeId, start: int = 0) -> list[DirEntry]:
        out: list[DirEntry] = []
        for e in stored_entries(self.vfs, ino, start):
            out.append(e)
            if len(out) >= self.readdir_limit:
                break
        return out

    async def read(self, ino: InodeId, off: int, size: int) -> bytes:
        if off < 0 or size < 0:
            raise Invalid()
        return await read_local(self.vfs, ino, off, size)

    async def readlink(self, ino: InodeId) -> bytes:
        return self.vfs.readlink(ino)

    async def getxattr(self, ino: InodeId, name: bytes) -> bytes:
        return self.vfs.getxattr(ino, name)

    async def listxattr(self, ino: InodeId) -> list[bytes]:
        return self.vfs.listxattr(ino)
