"""readdir: "." and "..", cookie order, and offsets that stay valid while the directory changes."""

from __future__ import annotations

import errno

import pytest

from dfs.errors import FsError
from dfs.types import ROOT_INODE
from tests.core.harness import Core


def test_dots_and_order(core: Core) -> None:
    d = core.mkdir("/d")
    for name in ["c", "a", "b"]:
        core.write_file(f"/d/{name}", b"")
    entries = list(core.vfs.readdir(d.ino))
    assert [e.name for e in entries] == [b".", b"..", b"c", b"a", b"b"]  # creation order
    assert entries[0].attr.ino == d.ino and entries[1].attr.ino == ROOT_INODE
    cookies = [e.cookie for e in entries]
    assert cookies == sorted(cookies) and len(set(cookies)) == len(cookies)
    # resuming after any cookie returns exactly the rest
    for i, e in enumerate(entries):
        assert [x.name for x in core.vfs.readdir(d.ino, e.cookie)] == [
            x.name for x in entries[i + 1 :]
        ]


def test_offsets_stable_while_directory_changes(core: Core) -> None:
    """Like a kernel paging through getdents while others create, delete and rename."""
    d = core.mkdir("/d")
    for i in range(300):  # more than one readdir batch
        core.write_file(f"/d/f{i:03}", b"")
    removed: set[bytes] = set()
    seen: list[bytes] = []
    pos = 0
    for step in range(1000):
        page = []
        for e in core.vfs.readdir(d.ino, pos):
            page.append(e)
            if len(page) == 37:
                break
        if not page:
            break
        seen += [e.name for e in page]
        pos = page[-1].cookie
        if step < 6:  # change the directory between the first pages
            victim = f"f{(step * 53) % 300:03}"
            core.unlink(f"/d/{victim}")
            removed.add(victim.encode())
            core.write_file(f"/d/new{step}", b"")
            core.rename(f"/d/new{step}", f"/d/moved{step}")
            core.rename(f"/d/f{299 - step}", f"/d/renamed{step}")
            removed.add(f"f{299 - step}".encode())
    stable = {f"f{i:03}".encode() for i in range(300)} - removed
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    assert stable <= set(seen), "an entry present all along was skipped"
    assert {f"moved{s}".encode() for s in range(6)} <= set(seen)  # added after the cursor


def test_removed_entry_not_returned_after_offset(core: Core) -> None:
    d = core.mkdir("/d")
    for n in "abcd":
        core.write_file(f"/d/{n}", b"")
    first = list(core.vfs.readdir(d.ino))[:3]  # ., .., a
    core.unlink("/d/b")
    core.unlink("/d/a")
    rest = [e.name for e in core.vfs.readdir(d.ino, first[-1].cookie)]
    assert rest == [b"c", b"d"]


def test_readdir_of_file_fails(core: Core) -> None:
    f = core.write_file("/f", b"")
    with pytest.raises(FsError) as e:
        list(core.vfs.readdir(f.ino))
    assert e.value.errno == errno.ENOTDIR
