"""Permissions through a real mount, as unprivileged users: access checks, ownership of new
files, sticky and setgid directories, umask, chmod/chown rules, set-ID clearing on write.

Every scenario runs the same operations as the same user on the mount and on a local
directory and requires identical outcomes; a few spot checks pin the expected answer so a
comparison of two wrong results cannot pass.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.fuse.support import NOBODY, user_ops

pytestmark = pytest.mark.fuse

OTHER = 65533  # a second unprivileged user
GROUP = 4321


def compare(
    mnt: Path,
    tmp_path: Path,
    setup: Callable[[Path], None],
    ops: Sequence[str],
    *,
    uid: int = NOBODY,
    gid: int = NOBODY,
    groups: Sequence[int] = (),
    umask: int = 0o022,
    inspect: Callable[[Path], object] | None = None,
) -> list[str]:
    """Run setup (as root) then ops (as uid) on the mount and on a local directory."""
    local = tmp_path / "local"
    local.mkdir(exist_ok=True)
    results = []
    for root in (mnt, local):
        setup(root)
        out = user_ops(root, ops, uid=uid, gid=gid, groups=groups, umask=umask)
        if inspect is not None:
            out.append(repr(inspect(root)))
        results.append(out)
    assert results[0] == results[1], f"\nmount: {results[0]}\nlocal: {results[1]}"
    return results[0]


def test_other_users_can_use_the_mount(mnt: Path) -> None:
    (mnt / "pub").write_text("public\n")
    os.mkdir(mnt / "drop", 0o777)
    os.chmod(mnt / "drop", 0o777)
    out = user_ops(
        mnt,
        [
            "sorted(os.listdir('.'))",
            "open('pub').read()",
            "open('drop/mine', 'w').write('x')",
            "os.stat('drop/mine').st_uid",
            "os.mkdir('drop/sub')",
            "os.rename('drop/mine', 'drop/sub/mine')",
            "os.unlink('drop/sub/mine')",
            "os.rmdir('drop/sub')",
        ],
    )
    assert out == ["['drop', 'pub']", "'public\\n'", "1", "65534", "ok", "ok", "ok", "ok"]


def _private(root: Path) -> None:
    (root / "secret").write_text("s\n")
    os.chmod(root / "secret", 0o600)
    (root / "readonly").write_text("r\n")
    os.chmod(root / "readonly", 0o644)
    (root / "closed").mkdir()
    (root / "closed" / "inside").write_text("i\n")
    os.chmod(root / "closed", 0o700)
    (root / "nosearch").mkdir()
    (root / "nosearch" / "f").write_text("f\n")
    os.chmod(root / "nosearch", 0o744)
    (root / "group").write_text("g\n")
    os.chown(root / "group", 0, GROUP)
    os.chmod(root / "group", 0o640)
    (root / "exec").write_text("#!/bin/sh\n")
    os.chmod(root / "exec", 0o744)


ACCESS_OPS = [
    "open('secret').read()",
    "open('readonly').read()",
    "open('readonly', 'a').write('x')",
    "os.truncate('readonly', 0)",
    "os.listdir('closed')",
    "open('closed/inside').read()",
    "sorted(os.listdir('nosearch'))",
    "os.stat('nosearch/f')",
    "open('group').read()",
    "os.access('exec', os.X_OK)",
    "os.access('readonly', os.R_OK)",
    "os.access('readonly', os.W_OK)",
    "open('new-in-root', 'w')",
    "os.unlink('readonly')",
    "os.rename('readonly', 'moved')",
    "os.setxattr('readonly', 'user.k', b'v')",
    "os.getxattr('secret', 'user.k')",
]


def test_access_checks(mnt: Path, tmp_path: Path) -> None:
    out = compare(mnt, tmp_path, _private, ACCESS_OPS)
    assert out[0] == "EACCES"  # a 0600 root file is unreadable
    assert out[1] == "'r\\n'"
    assert out[2] == "EACCES"
    assert out[4] == out[5] == "EACCES"
    assert out[6] == "['f']" and out[7] == "EACCES"
    assert out[8] == "EACCES"
    assert out[13] == "EACCES"


def test_supplementary_group_grants_access(mnt: Path, tmp_path: Path) -> None:
    out = compare(mnt, tmp_path, _private, ACCESS_OPS, groups=[GROUP])
    assert out[8] == "'g\\n'"
    out = compare(mnt, tmp_path, lambda r: None, ACCESS_OPS[8:9], gid=GROUP)
    assert out == ["'g\\n'"]


def test_new_files_belong_to_their_creator(mnt: Path, tmp_path: Path) -> None:
    def setup(root: Path) -> None:
        os.mkdir(root / "open", 0o777)
        os.chmod(root / "open", 0o777)

    ops = [
        "open('open/f', 'w').close()",
        "os.mkdir('open/d')",
        "os.symlink('f', 'open/l')",
        "os.mkfifo('open/p')",
        "[(os.lstat('open/' + n).st_uid, os.lstat('open/' + n).st_gid)"
        " for n in ('f', 'd', 'l', 'p')]",
        "os.chown('open/f', 65534, 65534)",  # to oneself: allowed
        "os.chown('open/f', -1, 4321)",  # a group one belongs to
        "os.lstat('open/f').st_gid",
    ]
    out = compare(mnt, tmp_path, setup, ops, groups=[GROUP])
    assert out[4] == repr([(NOBODY, NOBODY)] * 4)
    assert out[7] == str(GROUP)


def test_sticky_directory(mnt: Path, tmp_path: Path) -> None:
    def setup(root: Path) -> None:
        os.mkdir(root / "tmp")
        os.chmod(root / "tmp", 0o1777)
        (root / "tmp" / "roots").write_text("root's\n")
        os.chmod(root / "tmp" / "roots", 0o666)
        os.mkdir(root / "tmp" / "rootdir", 0o777)
        os.chmod(root / "tmp" / "rootdir", 0o777)

    ops = [
        "os.unlink('tmp/roots')",
        "os.rename('tmp/roots', 'tmp/mine')",
        "os.rmdir('tmp/rootdir')",
        "open('tmp/roots', 'a').write('appended')",  # writing is still allowed
        "open('tmp/mine', 'w').write('mine')",
        "os.rename('tmp/mine', 'tmp/mine2')",
        "os.rename('tmp/mine2', 'tmp/roots')",  # over root's file: EPERM
        "os.unlink('tmp/mine2')",
        "os.mkdir('tmp/mydir')",
    ]
    out = compare(mnt, tmp_path, setup, ops)
    assert out[:3] == ["EPERM", "EPERM", "EPERM"]
    assert out[3:8] == ["8", "4", "ok", "EPERM", "ok"]
    # Another unprivileged user cannot remove nobody's entries either.
    out = compare(
        mnt,
        tmp_path,
        lambda r: None,
        ["os.rmdir('tmp/mydir')", "os.mkdir('tmp/other')"],
        uid=OTHER,
        gid=OTHER,
    )
    assert out == ["EPERM", "ok"]
    # The owner of the directory may remove anything in it.
    assert user_ops(mnt / "tmp", ["os.rmdir('mydir')"], uid=0, gid=0) == ["ok"]


def test_setgid_directory(mnt: Path, tmp_path: Path) -> None:
    def setup(root: Path) -> None:
        os.mkdir(root / "sg")
        os.chown(root / "sg", 0, GROUP)
        os.chmod(root / "sg", 0o2777)
        (root / "sg" / "by-root").write_text("")

    def inspect(root: Path) -> object:
        return {
            p.name: (p.stat().st_uid, p.stat().st_gid, oct(p.stat().st_mode))
            for p in sorted((root / "sg").rglob("*"))
        }

    ops = [
        "open('sg/by-nobody', 'w').close()",
        "os.mkdir('sg/sub')",
        "os.mkdir('sg/sub/deeper')",
        "open('sg/sub/deeper/f', 'w').close()",
        # A non-member asking for setgid on a group-executable file does not get it.
        "os.close(os.open('sg/exe', os.O_CREAT | os.O_WRONLY, 0o2775))",
        "os.chmod('sg/by-nobody', 0o2755)",  # not a member of the file's group
        "oct(os.stat('sg/by-nobody').st_mode)",
    ]
    out = compare(mnt, tmp_path, setup, ops, inspect=inspect)
    got = eval(out[-1])  # noqa: S307 - our own repr
    assert {name: gid for name, (_, gid, _) in got.items()} == dict.fromkeys(got, GROUP)
    assert int(got["sub"][2], 8) & stat.S_ISGID and int(got["deeper"][2], 8) & stat.S_ISGID
    assert got["by-root"][0] == 0 and got["by-nobody"][0] == NOBODY


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002, 0o000])
def test_umask(mnt: Path, tmp_path: Path, umask: int) -> None:
    def setup(root: Path) -> None:
        os.mkdir(root / f"u{umask:o}", 0o777)
        os.chmod(root / f"u{umask:o}", 0o777)

    d = f"u{umask:o}"
    ops = [
        f"os.close(os.open('{d}/f', os.O_CREAT | os.O_WRONLY, 0o666))",
        f"os.mkdir('{d}/d', 0o777)",
        f"os.mkfifo('{d}/p', 0o666)",
        f"os.close(os.open('{d}/x', os.O_CREAT | os.O_WRONLY, 0o755))",
        f"[oct(stat.S_IMODE(os.stat('{d}/' + n).st_mode)) for n in 'fdpx']",
    ]
    out = compare(mnt, tmp_path, setup, ops, umask=umask)
    assert eval(out[-1])[0] == oct(0o666 & ~umask)  # noqa: S307


def test_chmod_chown_rules_for_non_owners(mnt: Path, tmp_path: Path) -> None:
    def setup(root: Path) -> None:
        (root / "roots").write_text("")
        os.chmod(root / "roots", 0o666)
        (root / "mine").write_text("")
        os.chown(root / "mine", NOBODY, NOBODY)

    ops = [
        "os.chmod('roots', 0o777)",
        "os.chown('roots', 65534, 65534)",
        "os.utime('roots', ns=(1, 1))",  # explicit times need ownership
        "os.utime('roots')",  # "now" needs only write permission
        "os.chmod('mine', 0o4755)",
        "oct(os.stat('mine').st_mode)",
        "os.chown('mine', 0, -1)",  # giving a file away
        "os.chown('mine', -1, 0)",  # to a group one is not in
        "os.chown('mine', -1, 4321)",  # to a group one is in
        "os.setxattr('roots', 'trusted.x', b'1')",
        "os.setxattr('mine', 'user.x', b'1')",
    ]
    out = compare(mnt, tmp_path, setup, ops, groups=[GROUP])
    assert out[:4] == ["EPERM", "EPERM", "EPERM", "ok"]
    assert out[6:9] == ["EPERM", "EPERM", "ok"]


def test_set_id_bits_cleared_when_others_write(mnt: Path, tmp_path: Path) -> None:
    names = ("w", "t", "o", "go")

    def setup(root: Path) -> None:
        for name in names:
            (root / name).write_text("#!/bin/sh\n")
            os.chmod(root / name, 0o6777)
        os.chmod(root / "go", 0o2767)  # setgid without group execute

    def inspect(root: Path) -> object:
        return [(n, oct(os.stat(root / n).st_mode)) for n in names]

    ops = [
        "open('w', 'a').write('x')",
        "os.truncate('t', 1)",
        "open('o', 'w').close()",  # O_TRUNC
        "open('go', 'w').close()",  # dfs itself applies Linux's rule here
    ]
    out = compare(mnt, tmp_path, setup, ops, inspect=inspect)
    modes = dict(eval(out[-1]))  # noqa: S307
    assert modes == {"w": "0o100777", "t": "0o100777", "o": "0o100777", "go": "0o100767"}


def test_set_id_bits_on_write_by_non_member_kernel_rule(mnt: Path, tmp_path: Path) -> None:
    """Linux (since 6.x) also drops a non-group-executable setgid bit when someone outside
    the file's group writes or truncates; FUSE's kernel side still applies the older rule
    (drop it only when group-executable) and sends dfs no request it could tell apart. A
    known deviation, pinned here so a change on either side is noticed."""
    for name in ("g", "t"):
        (mnt / name).write_text("x")
        os.chmod(mnt / name, 0o2767)
    assert user_ops(mnt, ["open('g', 'a').write('x')", "os.truncate('t', 0)"]) == ["1", "ok"]
    assert oct(os.stat(mnt / "g").st_mode) == oct(os.stat(mnt / "t").st_mode) == "0o102767"
