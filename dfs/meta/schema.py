"""THE on-disk metadata layout: every lmdb database, its key builder and its value format.

All integers in keys are big-endian so that lmdb's byte order is numeric order.
Values are fixed ``struct`` layouts where the record is hot (inodes, dirents,
checksums) and msgpack where it is rare and evolving (journal, volumes).

Databases (lmdb named sub-databases) and their key families::

    meta      b"format"            -> u32 FORMAT_VERSION
              b"node_id"           -> u16 NodeId of this node
              b"cluster_id"        -> utf-8 cluster id (standalone: random uuid)
              b"next_counter"      -> u64 last inode counter handed out
              b"next_cookie"       -> u64 last directory cookie handed out
              b"clean"             -> b"1" while cleanly closed, b"0" while a daemon runs
              b"seq" vol:u32       -> u64 last update sequence of the volume
    inodes    ino:u64              -> INODE struct (see pack_inode)
    dirents   dir:u64 name         -> DIRENT struct (child ino u64, cookie u64)
    dirpos    dir:u64 cookie:u64   -> name   (readdir order; cookies never reused)
    symlinks  ino:u64              -> target bytes
    xattrs    ino:u64 name         -> value bytes
    blocks    ino:u64 block:u64    -> u64 xxh3 digest of the block's logical bytes
    orphans   ino:u64              -> b""   (nlink == 0, data kept until forgotten)
    dirty     ino:u64              -> b""   (data written whose checksums are not settled)
    volumes   vol:u32              -> msgpack {"root": ino, "path": mount path in the tree}
    journal   vol:u32 seq:u64      -> msgpack write-set record (below; applied updates, trimmed)
    inline    ino:u64              -> the whole contents of a small regular file
    mounts    dir:u64              -> msgpack {"vol", "root", "path", "primary", "sites"}

A ``mounts`` record makes directory ``dir`` of the root volume a *mount point*:
the volume ``vol`` (root directory inode ``root``, on ``primary`` and the
storage ``sites``, a list of node names) covers it. The record is replicated
with the root volume, so every node knows every volume; ``dir`` itself stays
empty and is never shown: lookups and readdir show ``root`` in its place.

A regular file is *inline* while it has an ``inline`` record: its contents
(exactly ``size`` bytes, at most INLINE_MAX) live in lmdb, written in the same
transaction as its attributes and its block-0 digest, and it has no data file.
It moves to a data file when it grows past INLINE_MAX; while moving, a
``dirty`` record marks it, and an inline record always wins over a data file.

Journal records are write-sets. Every write transaction records each put and
delete on the REPLICATED databases (inodes, dirents, dirpos, symlinks, xattrs,
blocks, orphans, inline, mounts; not the per-node meta, dirty, volumes, journal), and
at commit stores them as::

    {"op": str, "ws": [[db_index, key, value or None (deleted)], ...],
     "d": [[kind, ino, a, n], ...],   # optional: data store changes, applied first
     "o": node id}                    # optional: the node the update came from

``d`` lists what the transaction changed in the data store, in order: ``"w"``
(n bytes written at offset a), ``"t"`` (data file cut to a bytes), ``"rm"``
(data file removed). The bytes themselves are not journaled: the primary
ships them with the record while it has them, and the file's current
contents of that range when a replica catches up later.

``db_index`` is the database's index in DB_NAMES; each key appears once, with
its value at the end of the transaction, so applying the list in any order to
the store as it was before the transaction gives the store after it (this is
what ``dfs.meta.replica.apply_writeset`` does on a replica). Values are
records as stored, bounded by the layout: inline contents and xattr values
are at most 64 KiB each.
``op`` names the update (``MetaStore.log``); it is "" for a transaction that
logged nothing but changed replicated records (checksum settles, atime,
purges of forgotten orphans): those get a sequence number of their own too,
so replicas see every replicated change and stay byte-for-byte equal. Inode
``version`` fields are stamped only where ``log`` names the update. Every
sequence number of a volume has exactly one record: an aborted transaction
gives its number back.

Readdir cookies 1 and 2 are "." and ".."; real entries start at FIRST_COOKIE.
A block with no ``blocks`` entry is a hole or not yet settled (see ``dirty``).
"""

from __future__ import annotations

import struct

from dfs.types import Attr, InodeId, VolumeId

FORMAT_VERSION = 1

DB_NAMES = (
    "meta",
    "inodes",
    "dirents",
    "dirpos",
    "symlinks",
    "xattrs",
    "blocks",
    "orphans",
    "dirty",
    "volumes",
    "journal",
    "inline",
    "mounts",
)

# Databases whose records a volume's journal carries (indexes into DB_NAMES); the rest
# (meta, dirty, volumes, journal) belong to one node.
REPLICATED = tuple(
    DB_NAMES.index(n)
    for n in (
        "inodes",
        "dirents",
        "dirpos",
        "symlinks",
        "xattrs",
        "blocks",
        "orphans",
        "inline",
        "mounts",
    )
)

FIRST_COOKIE = 3
INLINE_MAX = 64 * 1024  # one block: small files never touch the data store
MAX_NAME = 255
MAX_SYMLINK = 4095
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 65536
MAX_XATTR_TOTAL = 1 << 20  # per inode, all names and values

META_FORMAT = b"format"
META_NODE_ID = b"node_id"
META_CLUSTER_ID = b"cluster_id"
META_NEXT_COUNTER = b"next_counter"
META_NEXT_COOKIE = b"next_cookie"
META_CLEAN = b"clean"
# Records every store has, with their value size (0: any); a store without them is damaged.
META_REQUIRED = (
    (META_FORMAT, 4),
    (META_NODE_ID, 2),
    (META_CLUSTER_ID, 0),
    (META_NEXT_COUNTER, 8),
    (META_NEXT_COOKIE, 8),
)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U64U64 = struct.Struct(">QQ")
_U32U64 = struct.Struct(">IQ")

# mode uid gid nlink size atime mtime ctime btime rdev blocks version generation volume parent
_INODE = struct.Struct("<IIIIQqqqqQQQIIQ")
_DIRENT = struct.Struct("<QQ")
_DIGEST = struct.Struct("<Q")


def u16(v: int) -> bytes:
    return _U16.pack(v)


def u32(v: int) -> bytes:
    return _U32.pack(v)


def u64(v: int) -> bytes:
    return _U64.pack(v)


def read_u16(b: bytes) -> int:
    return int(_U16.unpack(b)[0])


def read_u32(b: bytes) -> int:
    return int(_U32.unpack(b)[0])


def read_u64(b: bytes) -> int:
    return int(_U64.unpack(b)[0])


# --- key builders, one per family -------------------------------------------------------


def inode_key(ino: int) -> bytes:
    return _U64.pack(ino)


def dirent_key(parent: int, name: bytes) -> bytes:
    return _U64.pack(parent) + name


def dirent_prefix(parent: int) -> bytes:
    return _U64.pack(parent)


def dirpos_key(parent: int, cookie: int) -> bytes:
    return _U64U64.pack(parent, cookie)


def symlink_key(ino: int) -> bytes:
    return _U64.pack(ino)


def xattr_key(ino: int, name: bytes) -> bytes:
    return _U64.pack(ino) + name


def block_key(ino: int, block: int) -> bytes:
    return _U64U64.pack(ino, block)


def block_of_key(key: bytes) -> tuple[int, int]:
    ino, blk = _U64U64.unpack(key)
    return int(ino), int(blk)


def ino_prefix(ino: int) -> bytes:
    """Prefix of every per-inode family keyed by ino first (xattrs, blocks, dirents)."""
    return _U64.pack(ino)


def orphan_key(ino: int) -> bytes:
    return _U64.pack(ino)


def dirty_key(ino: int) -> bytes:
    return _U64.pack(ino)


def seq_key(vol: int) -> bytes:
    return b"seq" + _U32.pack(vol)


def inline_key(ino: int) -> bytes:
    return _U64.pack(ino)


def volume_key(vol: int) -> bytes:
    return _U32.pack(vol)


def mount_key(ino: int) -> bytes:
    return _U64.pack(ino)


def journal_key(vol: int, seq: int) -> bytes:
    return _U32U64.pack(vol, seq)


def journal_of_key(key: bytes) -> tuple[int, int]:
    vol, seq = _U32U64.unpack(key)
    return int(vol), int(seq)


# --- value codecs -----------------------------------------------------------------------


def pack_inode(a: Attr) -> bytes:
    return _INODE.pack(
        a.mode,
        a.uid,
        a.gid,
        a.nlink,
        a.size,
        a.atime_ns,
        a.mtime_ns,
        a.ctime_ns,
        a.btime_ns,
        a.rdev,
        a.blocks,
        a.version,
        a.generation,
        a.volume,
        a.parent,
    )


def unpack_inode(ino: int, raw: bytes) -> Attr:
    (
        mode,
        uid,
        gid,
        nlink,
        size,
        atime,
        mtime,
        ctime,
        btime,
        rdev,
        blocks,
        version,
        generation,
        volume,
        parent,
    ) = _INODE.unpack(raw)
    return Attr(
        InodeId(ino),
        mode,
        uid,
        gid,
        nlink,
        size,
        atime,
        mtime,
        ctime,
        btime,
        rdev,
        blocks,
        version,
        generation,
        VolumeId(volume),
        InodeId(parent),
    )


def pack_dirent(child: int, cookie: int) -> bytes:
    return _DIRENT.pack(child, cookie)


def unpack_dirent(raw: bytes) -> tuple[InodeId, int]:
    child, cookie = _DIRENT.unpack(raw)
    return InodeId(child), int(cookie)


def pack_digest(d: int) -> bytes:
    return _DIGEST.pack(d)


def unpack_digest(raw: bytes) -> int:
    return int(_DIGEST.unpack(raw)[0])
