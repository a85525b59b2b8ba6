"""Tree paths as `dfs` commands take them: which local mount, which tree path, which host.

Every ``dfs`` command that takes a path in the tree accepts three spellings
and turns them into one ``TreePath`` with ``resolve``:

* a path inside a mounted dfs, relative or absolute:
  ``run/cluster/n1/mnt/a/b`` -> mount ``/abs/run/cluster/n1/mnt``, path ``/a/b``, host None;
* a host view inside a mount (after the Newcastle Connection):
  ``MNT/.../n2/a/b`` -> mount ``MNT``, path ``/a/b``, host ``n2``;
* the Newcastle form itself, ``/../n2/a/b`` -> path ``/a/b``, host ``n2``. It names no
  mount, so one is chosen: ``mount`` (a command's ``--mount MOUNT``), else the environment
  variable ``DFS_MOUNT``, else the only dfs mount in /proc/self/mountinfo. It is parsed
  from the raw string (``os.path`` would fold ``/..`` into ``/``); ``.`` and ``..`` after
  the host are applied by name (``/../n2/a/../b`` is ``/../n2/b``) and may not leave the
  host's tree.

API (everything else is private)::

    resolve(spec, *, mount=None, env=None, mounts=None) -> TreePath   # raises TreePathError
    fs_path(tree, host) -> Path        # MNT/path (host None) or MNT/.../HOST/path
    TreePath(mount, path, host)        # .target == fs_path(self, self.host); str() gives
                                       # "/a/b" or "/../n2/a/b"
    list_hosts(mount) -> list[str]     # the hosts of a mount (``ls MNT/...``), sorted
    read_mounts(text=None) -> list[MountEntry]   # dfs/mounts.py: parse mountinfo (default:
                                                 # this process's)
    TreePathError                      # a click.UsageError: its message says what is wrong

How a path is placed in a mount. The path is made absolute (against the
current directory) and its symlinks are resolved as the kernel would, except
a symlink in the last component that is itself in a dfs tree: that one is
kept (like ``lstat``; a trailing ``/`` follows it). The mount that holds the
result is the mountinfo entry with the longest mount point above it (the last
one listed, if mounts are stacked), so ``mnt/``, ``./mnt/a`` and a symlink to
``mnt`` all land in the same mount. It must be of type ``fuse.dfs``, and
``stat`` of its mount point must give the entry's device (a stale mount,
whose daemon died, is reported as such). A bind mount of a dfs subtree is
accepted: the tree path includes the mount's root, and the mount used is a
mount of the same file system's whole tree (only there is ``...`` to be found).

Host names are checked against ``list_hosts`` for the two host forms; with
``mounts`` (a parsed mount table, see ``read_mounts``) and ``env`` a caller or
a test replaces what this process would read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from dfs.cluster.views import VIEW_DIR_NAME
from dfs.mounts import MOUNTINFO, MountEntry, read_mounts

VIEW_DIR = os.fsdecode(VIEW_DIR_NAME)  # "...": the host views, in a mount's root
NEWCASTLE = "/.."  # the super-root of the Newcastle Connection: /../HOST/path
FSTYPE = "fuse.dfs"
ENV_MOUNT = "DFS_MOUNT"


class TreePathError(click.UsageError):
    """A path that names nothing in a dfs tree here; ``message`` says why and what to write."""


@dataclass(frozen=True, slots=True)
class TreePath:
    """A path in the dfs tree, as reached through one local mount.

    ``mount`` is the mount point (absolute) of a dfs mount of the whole tree;
    ``path`` is absolute and normalised ("/" for the root, no "." or ".."
    names, no trailing "/"); ``host`` is the node named by ``/../HOST`` or
    ``MNT/.../HOST``, or None for the tree as the mount shows it.
    """

    mount: Path
    path: str
    host: str | None = None

    @property
    def target(self) -> Path:
        """The file system path this spelling names: ``fs_path(self, self.host)``."""
        return fs_path(self, self.host)

    def __str__(self) -> str:
        return self.path if self.host is None else f"{NEWCASTLE}/{self.host}{_tail(self.path)}"


def fs_path(tree: TreePath, host: str | None) -> Path:
    """The path to open for ``tree.path``: ``MNT/path``, or HOST's copy ``MNT/.../HOST/path``."""
    base = tree.mount if host is None else tree.mount / VIEW_DIR / host
    return Path(f"{base}{_tail(tree.path)}")


def list_hosts(mount: Path) -> list[str]:
    """The hosts whose copies ``mount`` shows (``ls MOUNT/...``), sorted."""
    try:
        return sorted(os.listdir(mount / VIEW_DIR))
    except OSError as exc:
        raise TreePathError(
            f"{mount}: cannot list the hosts in {mount / VIEW_DIR} ({_errtext(exc)}); "
            "is it a node of a dfs cluster?"
        ) from None


def resolve(
    spec: str | os.PathLike[str],
    *,
    mount: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    mounts: Sequence[MountEntry] | None = None,
) -> TreePath:
    """The ``TreePath`` that ``spec`` names (see the module docstring for the spellings).

    ``mount`` and ``env`` (default ``os.environ``; only ``DFS_MOUNT`` is read)
    choose the mount for the Newcastle form and are ignored otherwise;
    ``mounts`` replaces the mount table of this process. Raises
    ``TreePathError`` for a path in no dfs mount, a mount that does not answer,
    an empty or unknown host, and ``..`` leaving a host's tree.
    """
    raw = os.fspath(spec)
    table = read_mounts() if mounts is None else list(mounts)
    if raw == NEWCASTLE or raw.startswith(NEWCASTLE + "/"):
        host, path = _newcastle(raw)
        mnt = _chosen_mount(mount, env, table)
        return TreePath(mnt, path, _known_host(host, mnt, raw))
    if not raw:
        raise TreePathError("an empty path names nothing")
    where = _canonical(raw)
    entry = _holder(where, table)
    if entry is None or entry.fstype != FSTYPE:  # a symlink to a dfs path is that path
        where = _canonical(raw, follow_last=True)
        entry = _holder(where, table)
    if entry is None or entry.fstype != FSTYPE:
        raise TreePathError(f"{raw}: not inside a dfs mount{_known(table)}")
    _check_answers(entry, raw)
    names = _names(where, entry.mount_point)
    if entry.root == "/" and names and names[0] == VIEW_DIR:
        if len(names) == 1:
            raise TreePathError(
                f"{raw}: names the list of hosts; write {Path(entry.mount_point) / VIEW_DIR}"
                "/HOST/path"
            )
        mnt = Path(entry.mount_point)
        return TreePath(mnt, _join(names[2:]), _known_host(names[1], mnt, raw))
    if entry.root == "/":
        return TreePath(Path(entry.mount_point), _join(names))
    path = _join([*_names(entry.root, "/"), *names])
    return TreePath(_whole_tree(entry, table, raw), path)


# --- the Newcastle form ------------------------------------------------------------------


def _newcastle(raw: str) -> tuple[str, str]:
    """``/../HOST/path`` -> (HOST, normalised path), by name: nothing is looked up."""
    host, _, rest = raw[len(NEWCASTLE) + 1 :].partition("/")
    if not host:
        raise TreePathError(f"{raw}: no host after {NEWCASTLE}/; write {NEWCASTLE}/HOST/path")
    if host in (".", "..", VIEW_DIR):
        raise TreePathError(f"{raw}: {host!r} is not a host name; write {NEWCASTLE}/HOST/path")
    names: list[str] = []
    for name in rest.split("/"):
        if name in ("", "."):
            continue
        if name == "..":
            if not names:
                raise TreePathError(f"{raw}: '..' leaves the tree of host {host}")
            names.pop()
        else:
            names.append(name)
    return host, _join(names)


def _chosen_mount(
    given: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
    table: Sequence[MountEntry],
) -> Path:
    """The mount for ``/../HOST/path``: --mount, else $DFS_MOUNT, else the only dfs mount."""
    if given is not None:
        return _mount_point(os.fspath(given), "--mount", table)
    value = (os.environ if env is None else env).get(ENV_MOUNT, "")
    if value:
        return _mount_point(value, ENV_MOUNT, table)
    found = _dfs_mount_points(table)
    if len(found) == 1:
        (entry,) = [e for e in table if e.mount_point == found[0] and e.fstype == FSTYPE][-1:]
        _check_answers(entry, found[0])
        return Path(found[0])
    what = "there is none here" if not found else f"there are several: {', '.join(found)}"
    raise TreePathError(
        f"the {NEWCASTLE}/HOST/path form needs a local dfs mount and {what}; "
        f"name one with --mount MOUNT or {ENV_MOUNT}=MOUNT"
    )


def _mount_point(value: str, source: str, table: Sequence[MountEntry]) -> Path:
    where = _canonical(value, follow_last=True)
    entry = _holder(where, table)
    if entry is None or entry.fstype != FSTYPE:
        raise TreePathError(f"{source} {value}: not a dfs mount{_known(table)}")
    if where != entry.mount_point:
        raise TreePathError(
            f"{source} {value}: not a dfs mount point (it is inside the dfs mount "
            f"{entry.mount_point})"
        )
    _check_answers(entry, value)
    if entry.root != "/":
        return _whole_tree(entry, table, value)
    return Path(where)


# --- placing a path in a mount -----------------------------------------------------------


def _canonical(raw: str, *, follow_last: bool = False) -> str:
    """``raw`` absolute with its symlinks resolved, except one in the last component."""
    path = raw if raw.startswith("/") else os.path.join(os.getcwd(), raw)
    head, last = os.path.split(path.rstrip("/") or "/")
    if follow_last or path.endswith("/") or last in ("", ".", ".."):
        return os.path.realpath(path)
    return os.path.join(os.path.realpath(head), last)


def _holder(where: str, table: Sequence[MountEntry]) -> MountEntry | None:
    """The mount holding the canonical path ``where``: longest mount point, last one stacked."""
    best: MountEntry | None = None
    for entry in table:
        mp = entry.mount_point
        inside = mp == "/" or where == mp or where.startswith(mp + "/")
        if inside and (best is None or len(mp) >= len(best.mount_point)):
            best = entry
    return best


def _check_answers(entry: MountEntry, raw: str) -> None:
    try:
        dev = os.stat(entry.mount_point).st_dev
    except OSError as exc:
        raise TreePathError(
            f"{raw}: the dfs mount {entry.mount_point} does not answer ({_errtext(exc)}); "
            "is its daemon running?"
        ) from None
    if dev != entry.dev:
        raise TreePathError(
            f"{raw}: {entry.mount_point} is not the dfs mount listed in {MOUNTINFO} "
            "(mounted or unmounted just now?)"
        )


def _whole_tree(entry: MountEntry, table: Sequence[MountEntry], raw: str) -> Path:
    """A mount of the whole tree of the file system that ``entry`` (a bind mount) shows part of."""
    for other in reversed(table):
        if other.dev == entry.dev and other.root == "/" and other.fstype == FSTYPE:
            return Path(other.mount_point)
    raise TreePathError(
        f"{raw}: {entry.mount_point} shows only {entry.root} of a dfs tree, "
        "and no mount of the whole tree was found"
    )


def _known_host(host: str, mnt: Path, raw: str) -> str:
    hosts = list_hosts(mnt)
    if host not in hosts:
        raise TreePathError(f"{raw}: unknown host {host!r} (hosts: {', '.join(hosts) or 'none'})")
    return host


def _dfs_mount_points(table: Sequence[MountEntry]) -> list[str]:
    return sorted({e.mount_point for e in table if e.fstype == FSTYPE and e.root == "/"})


def _known(table: Sequence[MountEntry]) -> str:
    found = _dfs_mount_points(table)
    return f" (dfs mounts here: {', '.join(found)})" if found else " (no dfs mount here)"


def _names(where: str, top: str) -> list[str]:
    rel = where[len(top) :] if top != "/" else where
    return [n for n in rel.split("/") if n]


def _join(names: Sequence[str]) -> str:
    return "/" + "/".join(names)


def _tail(path: str) -> str:
    return "" if path == "/" else path


def _errtext(exc: OSError) -> str:
    return exc.strerror or str(exc)


def choose_mount(
    given: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Path:
    """The local mount a command without a path works on: ``--mount``, else ``DFS_MOUNT``,
    else the only dfs mount here (TreePathError otherwise)."""
    return _chosen_mount(given, env, read_mounts())
