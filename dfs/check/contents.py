"""Checks of file contents: block digest records, data files, and (optionally) every digest.

Part of the checker (see ``dfs/check/checker.py`` for the list of invariants);
reading contents is the slow part of a check, so ``check_data_digests`` runs
only with ``verify_data`` and skips holes (SEEK_DATA) instead of reading them.
"""

from __future__ import annotations

from collections.abc import Iterator

from dfs.check.finding import CheckContext, Finding, kind
from dfs.check.scan import scan
from dfs.data.store import DataStore, data_blocks
from dfs.errors import FsError
from dfs.fs.blocks import read_block
from dfs.hashing import BLOCK_SIZE, block_digest
from dfs.meta import schema as S
from dfs.meta.store import MetaStore

EMPTY_DIGEST = block_digest(b"")


def check_blocks_records(ctx: CheckContext) -> Iterator[Finding]:
    """Block digests belong to existing regular files and to blocks before EOF."""
    idx = ctx.index
    for key, raw in scan(ctx.meta, ctx.meta.blocks):
        where = ("blocks", key)
        if len(key) != 16 or len(raw) != 8:
            yield Finding("stray-record", 0, f"blocks: malformed record {key.hex()}", True, where)
            continue
        ino, blk = S.block_of_key(key)
        info = idx.inodes.get(ino)
        if info is None:
            if ino not in idx.malformed:
                yield Finding(
                    "stray-record", ino, f"digest of block {blk} of a missing inode", True, where
                )
        elif not info.is_reg:
            yield Finding("stray-record", ino, f"block digest of a {kind(info.mode)}", True, where)
        elif blk >= info.nblocks:
            yield Finding(
                "digest-past-eof",
                ino,
                f"digest of block {blk}, past EOF ({info.size} bytes)",
                True,
                where,
                blk,
            )


# --- file contents ----------------------------------------------------------------------------


def check_data_files(ctx: CheckContext) -> Iterator[Finding]:
    idx = ctx.index
    for ino in ctx.data.all_inodes():
        path = ctx.data.path(ino)
        if not path.is_file():
            yield Finding(
                "misplaced-data-file", ino, f"data file for {ino:#x} not at {path}", False
            )
            continue
        info = idx.inodes.get(ino)
        if info is None:
            if ino not in idx.malformed:
                yield Finding("stray-data-file", ino, "data file of a missing inode", True)
            continue
        if not info.is_reg:
            yield Finding("stray-data-file", ino, f"data file of a {kind(info.mode)}", True)
            continue
        if ino in idx.inline:
            yield Finding(
                "inline-and-data-file",
                ino,
                "inline file also has a data file (a move to the data store was interrupted)",
                True,
            )
            continue
        size = path.stat().st_size
        if size > info.size:
            yield Finding(
                "data-past-eof",
                ino,
                f"data file has {size} bytes, the file {info.size}",
                True,
                value=info.size,
            )


def check_inline_records(ctx: CheckContext) -> Iterator[Finding]:
    """Inline contents belong to regular files and hold exactly their size, within the limit."""
    idx = ctx.index
    for ino, length in sorted(idx.inline.items()):
        where = ("inline", S.inline_key(ino))
        info = idx.inodes.get(ino)
        if info is None:
            if ino not in idx.malformed:
                yield Finding(
                    "stray-record", ino, "inline contents of a missing inode", True, where
                )
        elif not info.is_reg:
            yield Finding(
                "stray-record", ino, f"inline contents of a {kind(info.mode)}", True, where
            )
        elif length != info.size or length > S.INLINE_MAX:
            yield Finding(
                "inline-size",
                ino,
                f"inline contents of {length} bytes, file size {info.size} (limit {S.INLINE_MAX})",
                False,
            )


def stored_digests(meta: MetaStore, ino: int) -> dict[int, int]:
    out: dict[int, int] = {}
    for key, raw in scan(meta, meta.blocks, S.ino_prefix(ino)):
        if len(key) == 16 and len(raw) == 8:
            out[S.block_of_key(key)[1]] = S.unpack_digest(raw)
    return out


def check_data_digests(ctx: CheckContext) -> Iterator[Finding]:
    """Reads every block with data or a digest and compares (dirty inodes excepted)."""
    idx = ctx.index
    files = sorted(
        ino
        for ino, info in idx.inodes.items()
        if info.is_reg and info.size > 0 and ino not in idx.dirty
    )
    for n, ino in enumerate(files):
        yield from _verify_file(ctx, ino, idx.inodes[ino].size)
        ctx.report("verifying data", n + 1, len(files))


def _verify_file(ctx: CheckContext, ino: int, size: int) -> Iterator[Finding]:
    stored = stored_digests(ctx.meta, ino)
    if ino in ctx.index.inline:
        got = block_digest(read_block(ctx.meta, ctx.data, ino, 0, size))
        want = stored.get(0)
        if want is None and got != EMPTY_DIGEST:
            yield Finding(
                "unchecksummed-block", ino, "inline contents have no checksum", True, value=0
            )
        elif want is not None and got != want:
            yield Finding(
                "checksum-mismatch",
                ino,
                f"inline contents: stored checksum {want:016x}, contents hash to {got:016x}",
                True,
                value=0,
            )
        return
    try:
        fd = ctx.data.open(ino, create=False)
    except FsError as exc:
        yield Finding("data-unreadable", ino, f"cannot open data file: {exc}", False)
        return
    try:
        nblocks = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
        candidates = set(stored) | (data_blocks(fd, size) if fd is not None else set())
        for blk in sorted(b for b in candidates if b < nblocks):
            try:
                got = block_digest(DataStore.pread(fd, blk * BLOCK_SIZE, BLOCK_SIZE, size))
            except FsError as exc:
                yield Finding("data-unreadable", ino, f"block {blk}: {exc}", False, value=blk)
                continue
            want = stored.get(blk)
            if want is None:
                if got != EMPTY_DIGEST:
                    yield Finding(
                        "unchecksummed-block",
                        ino,
                        f"block {blk} has data but no checksum",
                        True,
                        value=blk,
                    )
            elif got != want:
                yield Finding(
                    "checksum-mismatch",
                    ino,
                    f"block {blk}: stored checksum {want:016x}, contents hash to {got:016x}",
                    True,
                    value=blk,
                )
    finally:
        if fd is not None:
            ctx.data.close(fd)
