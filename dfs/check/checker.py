"""The consistency checker: one ``check_<area>_<invariant>()`` per invariant, yielding Findings.

The checker is a library and the test oracle: every core test ends with
``check()`` returning nothing, and ``dfs fsck`` is a thin CLI over it. It only
reads (in short batched transactions, see ``dfs/check/scan.py``); fixing is
``dfs/check/repair.py``'s job. It expects a quiescent store: offline, or a
test's Vfs between two operations.

Invariants (finding codes in brackets; * = repairable):
  meta      identity records present and well-formed [meta-record]; the root
            volume record names the root inode [volume-record]; every journal
            key is (known volume, seq >= 1) [journal-bad-key*], every record
            decodes [journal-bad-record*], and no seq is above the volume's
            counter [journal-seq-ahead*].
  inodes    records decode [inode-malformed, stray-record*]; the root exists
            [root-missing*] and is a directory [root-not-dir]; counters of this
            node's inodes are not above ``next_counter`` [counter-ahead*].
  dirents   well-formed [dirent-malformed*], valid names [dirent-bad-name*], in
            an existing directory [dirent-bad-parent*], naming an existing inode
            [dangling-dirent*]; each has the dirpos entry of its cookie
            [dirpos-missing*, bad-cookie*] and each dirpos entry its dirent
            [dirpos-stale*]; no cookie above ``next_cookie`` [cookie-ahead*].
  tree      the root has no name [root-named*]; every other directory has
            exactly one [dir-multiple-names*] and its ``parent`` is the directory
            naming it [dir-parent*]; everything is reachable from the root
            unless it is an orphan [unreachable*, dir-cycle*]; link counts are
            names (directories: 2 + subdirectories) [nlink-mismatch*].
  orphans   orphans have no name [orphan-linked*] and nlink 0 [orphan-nlink*]
            (repair drops such orphan records: the inode is kept, not purged);
            every nameless nlink-0 inode is an orphan [nlink0-not-orphan*]
            (repair keeps it in /lost+found rather than let it be purged).
  symlinks  a symlink has a valid target [symlink-no-target, symlink-bad-target]
            and size == len(target) [symlink-size*]; nothing else has one.
  records   xattrs, symlink targets, orphan, dirty and block records belong to
            existing inodes of the right type [stray-record*]; digests only for
            blocks before EOF [digest-past-eof*]; a ``dirty`` record means
            checksums were never settled: nobody is writing offline
            [dirty-unsettled*].
  inline    inline contents belong to existing regular files [stray-record*] and
            hold exactly the file's size, within INLINE_MAX [inline-size];
            an inline file has no data file [inline-and-data-file*].
  data      (in dfs/check/contents.py) data files only for existing regular
            inodes [stray-data-file*, misplaced-data-file], never longer than
            the file [data-past-eof*];
            with ``verify_data``: every digest matches the contents
            [checksum-mismatch*, data-unreadable] and no block with data lacks
            one [unchecksummed-block*] (inodes with a dirty record excepted).
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator

import lmdb
import msgpack

from dfs.check.contents import (
    EMPTY_DIGEST,
    check_blocks_records,
    check_data_digests,
    check_data_files,
    check_inline_records,
    stored_digests,
)
from dfs.check.finding import CheckContext, Finding, kind
from dfs.check.scan import Index, Progress, get, scan, scan_batches, valid_name
from dfs.data.store import DataStore
from dfs.meta import schema as S
from dfs.meta.store import MetaStore
from dfs.types import COUNTER_MASK, NODE_SHIFT, ROOT_INODE, ROOT_VOLUME

__all__ = ["CHECKS", "EMPTY_DIGEST", "CheckContext", "Finding", "check", "stored_digests"]


# --- meta -----------------------------------------------------------------------------------


def check_meta_identity(ctx: CheckContext) -> Iterator[Finding]:
    with ctx.meta.read() as txn:
        for key, size in S.META_REQUIRED:
            raw = get(txn, key, ctx.meta.meta)
            if raw is None or (size and len(raw) != size):
                state = "missing" if raw is None else f"malformed ({len(raw)} bytes)"
                yield Finding("meta-record", 0, f"meta record {key.decode()!r} {state}", False)
        fmt = get(txn, S.META_FORMAT, ctx.meta.meta)
        if fmt is not None and len(fmt) == 4 and S.read_u32(fmt) != S.FORMAT_VERSION:
            yield Finding(
                "meta-record", 0, f"format version {S.read_u32(fmt)}, not {S.FORMAT_VERSION}", False
            )
        clean = get(txn, S.META_CLEAN, ctx.meta.meta)
        if clean not in (None, b"0", b"1"):
            yield Finding("meta-record", 0, f"meta record 'clean' is {clean!r}", False)


def _volumes(meta: MetaStore) -> dict[int, dict[str, object] | None]:
    """Every volume record (None when it does not decode)."""
    out: dict[int, dict[str, object] | None] = {}
    for key, raw in scan(meta, meta.volumes):
        if len(key) != 4:
            continue
        try:
            rec = msgpack.unpackb(raw)
        except Exception:  # noqa: BLE001 - any decoding failure is a finding
            rec = None
        out[S.read_u32(key)] = rec if isinstance(rec, dict) else None
    return out


def check_meta_volumes(ctx: CheckContext) -> Iterator[Finding]:
    vols = _volumes(ctx.meta)
    for key, _ in scan(ctx.meta, ctx.meta.volumes):
        if len(key) != 4:
            yield Finding("volume-record", 0, f"malformed volume key {key.hex()}", False)
    if ROOT_VOLUME not in vols:
        yield Finding("volume-record", ROOT_INODE, "the root volume has no record", False)
    for vol, rec in sorted(vols.items()):
        if rec is None or not isinstance(rec.get("root"), int):
            yield Finding("volume-record", 0, f"volume {vol}: record does not decode", False)
            continue
        root = rec["root"]
        assert isinstance(root, int)
        if vol == ROOT_VOLUME and root != ROOT_INODE:
            yield Finding("volume-record", root, f"root volume's root is {root:#x}", False)
        info = ctx.index.inodes.get(root)
        if info is not None and not info.is_dir:
            yield Finding("volume-record", root, f"volume {vol}: root is not a directory", False)


def check_journal_keys(ctx: CheckContext) -> Iterator[Finding]:
    vols = _volumes(ctx.meta)
    with ctx.meta.read() as txn:
        seqs = {}
        for vol in vols:
            raw = get(txn, S.seq_key(vol), ctx.meta.meta)
            seqs[vol] = S.read_u64(raw) if raw is not None and len(raw) == 8 else 0
    ahead: dict[int, bytes] = {}
    for key, raw in scan(ctx.meta, ctx.meta.journal):
        where = ("journal", key)
        if len(key) != 12:
            yield Finding("journal-bad-key", 0, f"malformed journal key {key.hex()}", True, where)
            continue
        vol, seq = S.journal_of_key(key)
        if vol not in vols or seq == 0:
            why = "unknown volume" if vol not in vols else "sequence 0"
            yield Finding("journal-bad-key", 0, f"journal entry {vol}:{seq}: {why}", True, where)
            continue
        try:
            rec = msgpack.unpackb(raw)
            ok = (
                isinstance(rec, dict)
                and isinstance(rec.get("op"), str)
                and isinstance(rec.get("ws"), list)
            )
        except Exception:  # noqa: BLE001 - any decoding failure is a finding
            ok = False
        if not ok:
            yield Finding(
                "journal-bad-record", 0, f"journal entry {vol}:{seq} does not decode", True, where
            )
        if seq > seqs[vol]:
            ahead[vol] = key
    for vol, key in sorted(ahead.items()):
        seq = S.journal_of_key(key)[1]
        yield Finding(
            "journal-seq-ahead",
            0,
            f"volume {vol}: journal reaches seq {seq}, its counter is {seqs[vol]}",
            True,
            ("journal", key),
            seq,
        )


# --- inodes ---------------------------------------------------------------------------------


def check_inodes_records(ctx: CheckContext) -> Iterator[Finding]:
    for ino, why in sorted(ctx.index.malformed.items()):
        yield Finding("inode-malformed", ino, f"inode record {why}", False)
    for key, _ in scan(ctx.meta, ctx.meta.inodes):
        if len(key) != 8:
            yield Finding(
                "stray-record", 0, f"inodes: malformed key {key.hex()}", True, ("inodes", key)
            )


def check_inodes_root(ctx: CheckContext) -> Iterator[Finding]:
    root = ctx.index.inodes.get(ROOT_INODE)
    if ctx.index.root_missing:
        yield Finding("root-missing", ROOT_INODE, "the root directory has no inode", True)
    elif root is not None and not root.is_dir:
        yield Finding("root-not-dir", ROOT_INODE, f"the root is a {kind(root.mode)}", False)
    elif root is not None and root.parent != ROOT_INODE:
        yield Finding(
            "dir-parent", ROOT_INODE, f"root's parent is {root.parent:#x}", True, value=ROOT_INODE
        )


def check_inodes_counters(ctx: CheckContext) -> Iterator[Finding]:
    idx = ctx.index
    mine = [
        ino & COUNTER_MASK
        for ino in (*idx.inodes, *idx.malformed)
        if ino != ROOT_INODE and ino >> NODE_SHIFT == idx.node_id
    ]
    top = max(mine, default=0)
    if top > idx.next_counter:
        yield Finding(
            "counter-ahead",
            0,
            f"an inode has counter {top}, but next_counter is {idx.next_counter}: "
            "new inodes would reuse ids",
            True,
            value=top,
        )


# --- directory entries ------------------------------------------------------------------------


def check_dirents_targets(ctx: CheckContext) -> Iterator[Finding]:
    idx = ctx.index
    for key, raw in scan(ctx.meta, ctx.meta.dirents):
        where = ("dirents", key)
        if len(key) <= 8 or len(raw) != 16:
            yield Finding("dirent-malformed", 0, f"malformed entry {key.hex()}", True, where)
            continue
        parent = S.read_u64(key[:8])
        name = key[8:]
        child, _ = S.unpack_dirent(raw)
        p = idx.inodes.get(parent)
        shown = name.decode(errors="backslashreplace")
        if not valid_name(name):
            yield Finding(
                "dirent-bad-name", parent, f"entry with invalid name {name!r}", True, where
            )
        elif not idx.exists(parent):
            yield Finding(
                "dirent-bad-parent", parent, f"entry {shown!r} in a missing directory", True, where
            )
        elif p is not None and not p.is_dir:
            yield Finding(
                "dirent-bad-parent", parent, f"entry {shown!r} in a {kind(p.mode)}", True, where
            )
        elif not idx.exists(child):
            yield Finding(
                "dangling-dirent",
                parent,
                f"entry {shown!r} names missing inode {child:#x}",
                True,
                where,
            )


def check_dirents_dirpos(ctx: CheckContext) -> Iterator[Finding]:
    for items in scan_batches(ctx.meta, ctx.meta.dirents):
        with ctx.meta.read() as txn:
            for key, raw in items:
                if len(key) <= 8 or len(raw) != 16:
                    continue
                parent = S.read_u64(key[:8])
                name = key[8:]
                _, cookie = S.unpack_dirent(raw)
                shown = name.decode(errors="backslashreplace")
                where = ("dirents", key)
                if cookie < S.FIRST_COOKIE:
                    yield Finding(
                        "bad-cookie",
                        parent,
                        f"entry {shown!r} has reserved cookie {cookie}",
                        True,
                        where,
                        cookie,
                    )
                    continue
                pos = get(txn, S.dirpos_key(parent, cookie), ctx.meta.dirpos)
                if pos != name:
                    other = "" if pos is None else f" (it names {bytes(pos)!r})"
                    yield Finding(
                        "dirpos-missing",
                        parent,
                        f"entry {shown!r} (cookie {cookie}) has no readdir position{other}",
                        True,
                        where,
                        cookie,
                    )


def check_dirpos_dirents(ctx: CheckContext) -> Iterator[Finding]:
    for items in scan_batches(ctx.meta, ctx.meta.dirpos):
        with ctx.meta.read() as txn:
            for key, name in items:
                where = ("dirpos", key)
                if len(key) != 16:
                    yield Finding(
                        "stray-record", 0, f"dirpos: malformed key {key.hex()}", True, where
                    )
                    continue
                parent, cookie = S.block_of_key(key)  # same (u64, u64) layout
                raw = get(txn, S.dirent_key(parent, name), ctx.meta.dirents) if name else None
                if raw is None or len(raw) != 16 or S.unpack_dirent(raw)[1] != cookie:
                    yield Finding(
                        "dirpos-stale",
                        parent,
                        f"readdir position {cookie} names {bytes(name)!r}, which has no entry "
                        "with that cookie",
                        True,
                        where,
                        cookie,
                    )


def check_dirents_cookies(ctx: CheckContext) -> Iterator[Finding]:
    top = 0
    for _, raw in scan(ctx.meta, ctx.meta.dirents):
        if len(raw) == 16:
            top = max(top, S.unpack_dirent(raw)[1])
    for key, _ in scan(ctx.meta, ctx.meta.dirpos):
        if len(key) == 16:
            top = max(top, S.block_of_key(key)[1])
    if top > ctx.index.next_cookie:
        yield Finding(
            "cookie-ahead",
            0,
            f"a directory cookie is {top}, but next_cookie is {ctx.index.next_cookie}: "
            "new entries would reuse readdir offsets",
            True,
            value=top,
        )


# --- the tree -----------------------------------------------------------------------------------


def check_tree_names(ctx: CheckContext) -> Iterator[Finding]:
    """Directories have one name and a matching ``parent``; the root has none."""
    idx = ctx.index
    for ino, info in sorted(idx.inodes.items()):
        if not info.is_dir:
            continue
        names = idx.names.get(ino, [])
        if idx.is_top(ino):
            if names:
                yield Finding("root-named", ino, f"the root has {len(names)} names", True)
            continue
        if len(names) > 1:
            where = ", ".join(f"{p:#x}/{n.decode(errors='backslashreplace')}" for p, n in names)
            yield Finding(
                "dir-multiple-names", ino, f"directory has {len(names)} names: {where}", True
            )
        elif len(names) == 1 and info.parent != names[0][0]:
            yield Finding(
                "dir-parent",
                ino,
                f"parent field is {info.parent:#x}, but it is named in {names[0][0]:#x}",
                True,
                value=names[0][0],
            )


def check_tree_reachable(ctx: CheckContext) -> Iterator[Finding]:
    """Everything but orphans is reachable from the root; reports only the top of a lost tree."""
    idx = ctx.index
    lost = idx.lost()
    for ino in sorted(lost):
        info = idx.inodes[ino]
        if not idx.names.get(ino) and info.nlink == 0:
            continue  # check_orphans_nlink reports it
        if not idx.lost_parents(ino, lost):
            where = "has no name" if not idx.names.get(ino) else "is named only in orphans"
            yield Finding(
                "unreachable", ino, f"{kind(info.mode)} {where} (nlink {info.nlink})", True
            )
    # Lost directories whose chain of names never ends at a top: cycles.
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    for start in sorted(lost):
        if state.get(start) or not idx.inodes[start].is_dir:
            continue
        path: list[int] = []
        cur: int | None = start
        while cur is not None and not state.get(cur):
            state[cur] = 1
            path.append(cur)
            parents = idx.lost_parents(cur, lost)
            cur = parents[0] if parents else None
        if cur is not None and state[cur] == 1:
            cycle = path[path.index(cur) :]
            members = ", ".join(f"{d:#x}" for d in cycle)
            yield Finding(
                "dir-cycle", min(cycle), f"directories name each other in a loop: {members}", True
            )
        for d in path:
            state[d] = 2


def check_links_nlink(ctx: CheckContext) -> Iterator[Finding]:
    idx = ctx.index
    for ino, info in sorted(idx.inodes.items()):
        want = idx.expected_nlink(ino)
        if ino == ROOT_INODE and idx.root_missing:
            continue  # recreated by repair, then counted
        if want is not None and info.nlink != want:
            yield Finding(
                "nlink-mismatch",
                ino,
                f"link count {info.nlink}, expected {want}",
                True,
                value=want,
            )


def check_orphans_nlink(ctx: CheckContext) -> Iterator[Finding]:
    idx = ctx.index
    for ino in sorted(idx.orphans):
        info = idx.inodes.get(ino)
        if info is None:
            continue  # check_records_owner reports the stray orphan record
        if idx.names.get(ino):
            yield Finding(
                "orphan-linked",
                ino,
                f"orphan (to be purged) still has {len(idx.names[ino])} names",
                True,
            )
        elif info.nlink != 0:
            yield Finding("orphan-nlink", ino, f"orphan with link count {info.nlink}", True)
    for ino, info in sorted(idx.inodes.items()):
        if (
            info.nlink == 0
            and ino not in idx.orphans
            and not idx.is_top(ino)
            and not idx.names.get(ino)
        ):
            yield Finding(
                "nlink0-not-orphan",
                ino,
                f"{kind(info.mode)} with no name and link count 0 is not an orphan",
                True,
            )


# --- symlinks and per-inode records ---------------------------------------------------------


def check_symlinks_target(ctx: CheckContext) -> Iterator[Finding]:
    links = sorted(ino for ino, info in ctx.index.inodes.items() if info.is_lnk)
    for i in range(0, len(links), 1000):
        with ctx.meta.read() as txn:
            for ino in links[i : i + 1000]:
                target = get(txn, S.symlink_key(ino), ctx.meta.symlinks)
                size = ctx.index.inodes[ino].size
                if target is None:
                    yield Finding("symlink-no-target", ino, "symlink without a target", False)
                elif not target or len(target) > S.MAX_SYMLINK:
                    yield Finding(
                        "symlink-bad-target", ino, f"target of {len(target)} bytes", False
                    )
                elif size != len(target):
                    yield Finding(
                        "symlink-size",
                        ino,
                        f"size {size}, target is {len(target)} bytes",
                        True,
                        value=len(target),
                    )


def check_records_owner(ctx: CheckContext) -> Iterator[Finding]:
    """xattrs, symlink targets, orphan and dirty records belong to existing inodes."""
    idx = ctx.index
    families: list[tuple[str, lmdb._Database, Callable[[int], str | None]]] = [
        ("xattrs", ctx.meta.xattrs, lambda ino: None),
        ("symlinks", ctx.meta.symlinks, lambda ino: _need(idx, ino, stat.S_IFLNK)),
        ("orphans", ctx.meta.orphans, lambda ino: None),
        ("dirty", ctx.meta.dirty, lambda ino: _need(idx, ino, stat.S_IFREG)),
    ]
    for db_name, db, wrong_type in families:
        for key, _ in scan(ctx.meta, db):
            where = (db_name, key)
            if (len(key) <= 8) if db_name == "xattrs" else (len(key) != 8):
                yield Finding(
                    "stray-record", 0, f"{db_name}: malformed key {key.hex()}", True, where
                )
                continue
            ino = S.read_u64(key[:8])
            if not idx.exists(ino):
                yield Finding(
                    "stray-record", ino, f"{db_name} record of a missing inode", True, where
                )
                continue
            why = wrong_type(ino)
            if why is not None:
                yield Finding("stray-record", ino, f"{db_name} record of {why}", True, where)


def _need(idx: Index, ino: int, fmt: int) -> str | None:
    info = idx.inodes.get(ino)
    if info is None or stat.S_IFMT(info.mode) == fmt:
        return None
    return f"a {kind(info.mode)}"


def check_records_dirty(ctx: CheckContext) -> Iterator[Finding]:
    for ino in sorted(ctx.index.dirty):
        info = ctx.index.inodes.get(ino)
        if info is not None and info.is_reg:
            yield Finding(
                "dirty-unsettled",
                ino,
                "checksums were never settled after a write (daemon killed?)",
                True,
            )


# --- all of it ----------------------------------------------------------------------------------

CHECKS: tuple[Callable[[CheckContext], Iterator[Finding]], ...] = (
    check_meta_identity,
    check_meta_volumes,
    check_inodes_records,
    check_inodes_root,
    check_inodes_counters,
    check_dirents_targets,
    check_dirents_dirpos,
    check_dirpos_dirents,
    check_dirents_cookies,
    check_tree_names,
    check_tree_reachable,
    check_links_nlink,
    check_orphans_nlink,
    check_symlinks_target,
    check_records_owner,
    check_records_dirty,
    check_blocks_records,
    check_inline_records,
    check_data_files,
    check_journal_keys,
)


def check(
    meta: MetaStore,
    data: DataStore,
    *,
    verify_data: bool = True,
    progress: Progress | None = None,
) -> list[Finding]:
    """Every finding on the store; empty means consistent. Only reads."""
    ctx = CheckContext(meta, data, progress)
    checks = CHECKS + ((check_data_digests,) if verify_data else ())
    out: list[Finding] = []
    for i, fn in enumerate(checks):
        out.extend(fn(ctx))
        ctx.report("checking", i + 1, len(checks))
    return out
