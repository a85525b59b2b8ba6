"""The arguments of ``fs.op``: updates (and handle operations) a node sends to a volume's primary.

Each operation has one typed argument record, used by both sides: the sender builds it and
sends its fields as a list (``wire``), the primary decodes the list into it with msgspec
(``decode``: exact length, exact types, ranges), so a handler only ever sees well-formed
arguments and an exception inside one is a bug, not a malformed request. The caller's
identity travels beside them as ``[uid, gid, umask, groups]`` (``pack_ctx``), as NFS's
AUTH_SYS does. docs/PROTOCOL.md lists the operations.
"""

from __future__ import annotations

import errno
from typing import Annotated, Any

import msgspec

from dfs.errors import FsError
from dfs.fs.ctx import Ctx, SetAttrs

MAX_OFF = (1 << 63) - 1
MAX_ARGS = 8
MAX_GROUPS = 65536

Ino = Annotated[int, msgspec.Meta(ge=1, le=MAX_OFF)]
Handle = Annotated[int, msgspec.Meta(ge=0, le=MAX_OFF)]
Offset = Annotated[int, msgspec.Meta(ge=0, le=MAX_OFF)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1 << 31)]
Flags = Annotated[int, msgspec.Meta(ge=0, le=(1 << 32) - 1)]
Mode = Annotated[int, msgspec.Meta(ge=0, le=(1 << 32) - 1)]
Id = Annotated[int, msgspec.Meta(ge=0, le=(1 << 32) - 1)]


class _Args(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    pass


# --- handle operations (a handle the primary opened for the caller) ---------------------------


class Read(_Args):
    fh: Handle
    off: Offset
    size: Count


class Write(_Args):
    fh: Handle
    off: Offset
    data: bytes


class Fsync(_Args):
    fh: Handle
    datasync: bool


class Flush(_Args):
    fh: Handle


class Release(_Args):
    fh: Handle


# --- updates of a volume's namespace and attributes --------------------------------------------


class Sync(_Args):
    ino: Ino


class SetAttrsWire(_Args):
    mode: Mode | None
    uid: Id | None
    gid: Id | None
    size: Offset | None
    atime_ns: int | None
    mtime_ns: int | None
    ctime_ns: int | None


class Setattr(_Args):
    ino: Ino
    ch: SetAttrsWire


class Mknod(_Args):
    parent: Ino
    name: bytes
    mode: Mode
    rdev: Id


class Mkdir(_Args):
    parent: Ino
    name: bytes
    mode: Mode


class Symlink(_Args):
    parent: Ino
    name: bytes
    target: bytes


class Link(_Args):
    ino: Ino
    new_parent: Ino
    new_name: bytes


class Unlink(_Args):
    parent: Ino
    name: bytes


class Rmdir(_Args):
    parent: Ino
    name: bytes


class Rename(_Args):
    old_parent: Ino
    old_name: bytes
    new_parent: Ino
    new_name: bytes
    flags: Flags


class Setxattr(_Args):
    ino: Ino
    name: bytes
    value: bytes
    flags: Flags


class Removexattr(_Args):
    ino: Ino
    name: bytes


class Create(_Args):
    parent: Ino
    name: bytes
    mode: Mode
    flags: Flags


class Open(_Args):
    ino: Ino
    flags: Flags


OPS: dict[str, type[_Args]] = {
    "read": Read,
    "write": Write,
    "fsync": Fsync,
    "flush": Flush,
    "release": Release,
    "sync": Sync,
    "setattr": Setattr,
    "mknod": Mknod,
    "mkdir": Mkdir,
    "symlink": Symlink,
    "link": Link,
    "unlink": Unlink,
    "rmdir": Rmdir,
    "rename": Rename,
    "setxattr": Setxattr,
    "removexattr": Removexattr,
    "create": Create,
    "open": Open,
}
NAMES: dict[type[_Args], str] = {t: n for n, t in OPS.items()}


def name_of(args: _Args) -> str:
    return NAMES[type(args)]


def wire(args: _Args) -> list[Any]:
    """``args`` as the list ``fs.op`` carries."""
    return [wire(v) if isinstance(v, _Args) else v for v in msgspec.structs.astuple(args)]


def decode(op: str, raw: list[Any]) -> _Args:
    """The typed arguments of ``op``; EINVAL (never a bug) when they are malformed."""
    kind = OPS.get(op)
    if kind is None:
        raise FsError(errno.ENOSYS, f"unknown operation {op!r:.40}")
    try:
        return msgspec.convert(raw, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise FsError(errno.EINVAL, f"malformed {op} arguments: {exc}") from None


def setattrs_wire(ch: SetAttrs) -> SetAttrsWire:
    return SetAttrsWire(ch.mode, ch.uid, ch.gid, ch.size, ch.atime_ns, ch.mtime_ns, ch.ctime_ns)


def setattrs(w: SetAttrsWire) -> SetAttrs:
    return SetAttrs(w.mode, w.uid, w.gid, w.size, w.atime_ns, w.mtime_ns, w.ctime_ns)


class CallerWire(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    uid: Id
    gid: Id
    umask: Annotated[int, msgspec.Meta(ge=0, le=0o7777)]
    groups: Annotated[list[Id], msgspec.Meta(max_length=MAX_GROUPS)] | None


ROOT_CALLER = [0, 0, 0, None]


def pack_ctx(ctx: Ctx | None) -> list[Any]:
    if ctx is None:
        return list(ROOT_CALLER)
    groups = sorted(ctx.sup_groups()) if ctx.uid != 0 and ctx.sup_groups is not None else None
    return [ctx.uid, ctx.gid, ctx.umask, groups]


def unpack_ctx(v: Any) -> Ctx:
    try:
        c = msgspec.convert(v, CallerWire, strict=True)
    except msgspec.ValidationError as exc:
        raise FsError(errno.EINVAL, f"malformed caller context: {exc}") from None
    frozen = frozenset(c.groups or ())
    return Ctx(uid=c.uid, gid=c.gid, umask=c.umask, sup_groups=lambda: frozen)
