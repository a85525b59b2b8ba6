"""``dfs where PATH...``: what each node stores for a tree path, compared between nodes.

Everything is read through the host views of a local mount (``MNT/.../HOST/path``,
dfs/cluster/views.py), so this needs no access to other machines beyond what
the mount has. For each node ``probe`` makes a ``Copy``: type, size, mode,
owner, mtime (ns), link count and an xxh3_64 digest -- of the contents of a
regular file (read in 1 MiB chunks), of a symlink's target, or of a
directory's sorted names (with the entry count) -- or says the node has no
such path (``missing``), does not answer (``unreachable``, with the errno
text), or answered with another error. ``odd_ones`` names the nodes whose copy
differs from the majority's (every answering node, if there is no majority).
``survey`` probes every node of a path at once (one thread per node).

Paths are taken in every spelling of tools/paths.py; the Newcastle form
``/../B/path`` (or ``MNT/.../B/path``) shows only node B's copy.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click
import xxhash
from rich.table import Table
from rich.text import Text

from .output import Cell, is_terminal, render, table
from .paths import TreePath, TreePathError, fs_path, list_hosts, resolve

EXIT_SAME = 0
EXIT_DIFFERENT = 1
EXIT_USAGE = 2
CHUNK = 1 << 20
MISSING = frozenset({errno.ENOENT, errno.ENOTDIR})
UNREACHABLE = frozenset(
    {
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ETIMEDOUT,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ENOTCONN,
    }
)
_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
}

State = Literal["ok", "missing", "unreachable", "error"]


@dataclass(frozen=True, slots=True)
class Copy:
    """What one node stores for a path (the fields past ``error`` are set for ``ok`` only)."""

    node: str
    state: State
    error: str | None = None  # errno text, for unreachable and error
    kind: str | None = None  # file, dir, symlink, fifo, socket, char, block
    size: int | None = None  # None for a directory (its size is not compared)
    mode: int | None = None  # permission bits, with setuid/setgid/sticky
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    nlink: int | None = None
    digest: str | None = None  # xxh3_64 hex: contents, symlink target, or a directory's names
    entries: int | None = None  # a directory's entry count (without . and ..)
    rdev: int | None = None  # char and block devices

    def key(self) -> tuple[object, ...] | None:
        """What must agree between nodes; None for a node that did not answer."""
        if self.state == "unreachable":
            return None
        if self.state != "ok":
            return (self.state, self.error)
        return (
            self.kind,
            self.size,
            self.mode,
            self.uid,
            self.gid,
            self.mtime_ns,
            self.nlink,
            self.digest,
            self.entries,
            self.rdev,
        )


@dataclass(frozen=True, slots=True)
class Report:
    """The copies of one path on the nodes looked at, and which differ from the majority."""

    spec: str  # the path as given
    tree: TreePath
    copies: tuple[Copy, ...]
    differs: frozenset[str]

    @property
    def same(self) -> bool:
        """Every node answered, has the path, and stores the same thing."""
        return bool(self.copies) and not self.differs and all(c.state == "ok" for c in self.copies)


Probe = Callable[[Path, str], Copy]


def _failed(node: str, exc: OSError) -> Copy:
    text = exc.strerror or str(exc)
    if exc.errno in MISSING:
        return Copy(node, "missing")
    if exc.errno in UNREACHABLE:
        return Copy(node, "unreachable", text)
    return Copy(node, "error", text)


def _file_digest(path: Path) -> str:
    h = xxhash.xxh3_64()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the lstat
            raise OSError(errno.EAGAIN, "changed while being read")
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
    finally:
        os.close(fd)
    return str(h.hexdigest())


def _dir_digest(path: Path) -> tuple[str, int]:
    names = sorted(os.listdir(os.fsencode(path)))
    return str(xxhash.xxh3_64(b"".join(n + b"\0" for n in names)).hexdigest()), len(names)


def probe(path: Path, node: str) -> Copy:
    """``node``'s copy at ``path`` (a path under ``MNT/.../node``); never raises OSError."""
    try:
        st = os.lstat(path)
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "other")
        digest: str | None = None
        entries: int | None = None
        if kind == "file":
            digest = _file_digest(path)
        elif kind == "symlink":
            digest = str(xxhash.xxh3_64(os.readlink(os.fsencode(path))).hexdigest())
        elif kind == "dir":
            digest, entries = _dir_digest(path)
    except OSError as exc:
        return _failed(node, exc)
    return Copy(
        node,
        "ok",
        kind=kind,
        size=None if kind == "dir" else st.st_size,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        nlink=st.st_nlink,
        digest=digest,
        entries=entries,
        rdev=st.st_rdev if kind in ("char", "block") else None,
    )


def odd_ones(copies: Sequence[Copy]) -> frozenset[str]:
    """Nodes whose copy is not the majority's (all answering nodes if no copy has a majority)."""
    keys = {c.node: k for c in copies if (k := c.key()) is not None}
    counts = Counter(keys.values())
    if len(counts) <= 1:
        return frozenset()
    top, n = counts.most_common(1)[0]
    if 2 * n <= len(keys):
        return frozenset(keys)
    return frozenset(node for node, k in keys.items() if k != top)


def survey(spec: str, tree: TreePath, hosts: Sequence[str], *, probe: Probe = probe) -> Report:
    """Probe ``tree`` on ``hosts`` at once (one thread per host) and compare the copies."""
    with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        copies = tuple(pool.map(lambda h: probe(fs_path(tree, h), h), hosts))
    return Report(spec, tree, copies, odd_ones(copies))


# --- output -------------------------------------------------------------------------------


def copy_json(c: Copy, differs: bool) -> dict[str, Any]:
    return {
        "node": c.node,
        "state": c.state,
        "error": c.error,
        "type": c.kind,
        "size": c.size,
        "mode": c.mode,
        "mode_octal": None if c.mode is None else f"{c.mode:04o}",
        "uid": c.uid,
        "gid": c.gid,
        "mtime_ns": c.mtime_ns,
        "nlink": c.nlink,
        "digest": c.digest,
        "entries": c.entries,
        "rdev": c.rdev,
        "differs": differs,
    }


def report_json(r: Report) -> dict[str, Any]:
    return {
        "path": r.spec,
        "tree_path": r.tree.path,
        "host": r.tree.host,
        "mount": str(r.tree.mount),
        "same": r.same,
        "copies": [copy_json(c, c.node in r.differs) for c in r.copies],
    }


HEADER = ("NODE", "TYPE", "SIZE", "MODE", "UID:GID", "MTIME_NS", "NLINK", "DIGEST")


def _cells(c: Copy) -> list[str]:
    if c.kind == "dir":
        what = f"xxh3:{c.digest} ({c.entries} entries)"
    elif c.rdev is not None:
        what = f"rdev {os.major(c.rdev)}:{os.minor(c.rdev)}"
    else:
        what = "-" if c.digest is None else f"xxh3:{c.digest}"
    return [
        c.node,
        str(c.kind),
        "-" if c.size is None else str(c.size),
        f"{c.mode:04o}",
        f"{c.uid}:{c.gid}",
        str(c.mtime_ns),
        str(c.nlink),
        what,
    ]


def report_table(r: Report) -> Table:
    """The copies, one row each; a node without a copy has its state under TYPE and the
    reason under DIGEST; the last column flags copies that differ from the majority."""
    rows: list[list[Cell]] = []
    for c in r.copies:
        if c.state == "ok":
            cells: list[Cell] = list(_cells(c))
        else:
            cells = [c.node, Text(c.state, style="bold red"), *[""] * (len(HEADER) - 3)]
            cells.append("" if c.error is None else f"({c.error})")
        cells.append(Text("<- DIFFERS", style="bold red") if c.node in r.differs else "")
        rows.append(cells)
    return table([*HEADER, ""], rows, right=(2, 6))


def report_lines(r: Report, *, colour: bool = False) -> list[str]:
    """A title line, the table of the copies, then one line saying whether they agree."""
    verdict = _verdict(r)
    style = "green" if r.same else "bold red" if verdict.startswith("NOT") else "yellow"
    return [
        f"{r.tree}  (through {r.tree.mount})",
        *render(report_table(r), colour=colour, indent=2),
        *render(Text(verdict, style=style), colour=colour, indent=2),
    ]


def _verdict(r: Report) -> str:
    if r.same:
        nodes = [c.node for c in r.copies]
        if r.tree.host is not None:
            return f"stored on {nodes[0]}"
        return f"same on all {len(nodes)} nodes" if len(nodes) > 1 else f"stored on {nodes[0]}"
    answered = [c.node for c in r.copies if c.state != "unreachable"]
    down = [c.node for c in r.copies if c.state == "unreachable"]
    if answered and all(c.state in ("ok", "unreachable") for c in r.copies) and not r.differs:
        return f"same on {', '.join(answered)}; unreachable: {', '.join(down)}"
    parts = []
    if r.differs:
        parts.append("differs from the majority: " + ", ".join(sorted(r.differs)))
    for state in ("missing", "unreachable", "error"):
        nodes = [c.node for c in r.copies if c.state == state and c.node not in r.differs]
        if nodes:
            parts.append(f"{state}: {', '.join(nodes)}")
    return "NOT THE SAME: " + "; ".join(parts)


# --- the command --------------------------------------------------------------------------


@click.command("where")
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "--mount",
    "mount",
    metavar="MOUNT",
    default=None,
    help="The local dfs mount for /../HOST/path (default: $DFS_MOUNT, else the only one).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per PATH.")
def where(paths: tuple[str, ...], mount: str | None, as_json: bool) -> None:
    """Show what each node stores for PATHS: type, size, mode, owner, mtime, links, digest.

    A PATH is a path in a dfs mount (MNT/a/b), one node's copy (MNT/.../n2/a/b),
    or the Newcastle form /../n2/a/b, which uses --mount, $DFS_MOUNT or the only
    dfs mount here. With one node named, only that node's copy is shown.
    Contents are read through the host views of the local mount: a regular
    file's digest is the xxh3_64 of its contents, a symlink's of its target, a
    directory's of its sorted names. Copies that differ from the majority are
    flagged DIFFERS.

    \b
    Exit codes:
      0  every node answered and stores the same thing
      1  some copy differs, is missing or unreadable, or its node is unreachable
      2  bad usage, a path in no dfs mount, an unknown host, a mount that does not answer
    """
    try:
        trees = [resolve(p, mount=mount) for p in paths]
        hosts = {t.mount: list_hosts(t.mount) for t in trees if t.host is None}
    except TreePathError as exc:
        click.echo(f"dfs where: {exc.message}", err=True)
        sys.exit(EXIT_USAGE)
    reports = [
        survey(spec, t, [t.host] if t.host is not None else hosts[t.mount])
        for spec, t in zip(paths, trees, strict=True)
    ]
    if as_json:
        click.echo(json.dumps([report_json(r) for r in reports], indent=2))
    else:
        colour = is_terminal()
        click.echo("\n\n".join("\n".join(report_lines(r, colour=colour)) for r in reports))
    sys.exit(EXIT_SAME if all(r.same for r in reports) else EXIT_DIFFERENT)
