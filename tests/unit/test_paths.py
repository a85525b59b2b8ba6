"""Tree paths (tools/paths.py) and ``dfs where``'s comparison (tools/where.py), without FUSE.

The mount table is a fake mountinfo text naming ordinary directories in
tmp_path as ``fuse.dfs`` mounts (with their real device numbers, so the
device check passes); ``MNT/...`` is an ordinary directory with one
directory per host. ``dfs where`` runs on such a fake mount through its CLI
(its digests and flags on copies made to differ on purpose), and with an
injected probe for what a plain directory cannot fake (an unreachable node).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import click
import pytest
import xxhash
from click.testing import CliRunner
from dfs_tools import paths as P
from dfs_tools import where as W
from dfs_tools.cli import main

import dfs.mounts

HOSTS = ("n1", "n2", "n3")
MTIME = 1_700_000_000_123_456_789


def dev_field(path: Path) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


def escape(path: Path | str) -> str:
    return str(path).replace("\\", "\\134").replace(" ", "\\040")


def line(n: int, path: Path | str, fstype: str, *, root: str = "/", dev: str | None = None) -> str:
    dev = dev or dev_field(Path(path))
    return f"{n} 1 {dev} {escape(root)} {escape(path)} rw,relatime shared:{n} - {fstype} src rw"


class Fake:
    """A fake dfs mount at ROOT/mnt: a tree, host views of three hosts, and a mount table."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mnt = root / "mnt"
        (self.mnt / "a" / "b").mkdir(parents=True)
        (self.mnt / "a" / "f").write_text("hello\n")
        (self.mnt / "a" / "lnk").symlink_to("b")
        for host in HOSTS:
            (self.mnt / P.VIEW_DIR / host / "a").mkdir(parents=True)
        (root / "other").mkdir()
        self.lines = [line(1, "/", "ext4"), line(40, self.mnt, "fuse.dfs")]

    def table(self, *extra: str) -> list[P.MountEntry]:
        return P.read_mounts("\n".join([*self.lines, *extra]) + "\n")

    def resolve(self, spec: str | os.PathLike[str], *extra: str, **kw: object) -> P.TreePath:
        kw.setdefault("env", {})
        return P.resolve(spec, mounts=self.table(*extra), **kw)  # type: ignore[arg-type]

    def error(self, spec: str | os.PathLike[str], *extra: str, **kw: object) -> str:
        with pytest.raises(P.TreePathError) as exc:
            self.resolve(spec, *extra, **kw)
        return exc.value.message


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    return Fake(tmp_path)


# --- mountinfo ------------------------------------------------------------------------------


def test_read_mounts_parses_and_unescapes() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        "42 27 0:39 / /tmp/with\\040space/mnt rw,nosuid - fuse.dfs dfs rw,user_id=0\n"
        "garbage line\n"
        "43 27 0:40 / /x rw shared:3 master:4 - fuse.sshfs host:/ rw\n"
    )
    got = P.read_mounts(text)
    assert got == [
        P.MountEntry("/mnt/parent", "/mnt1", os.makedev(98, 0), "ext3", "/dev/root"),
        P.MountEntry("/tmp/with space/mnt", "/", os.makedev(0, 39), "fuse.dfs", "dfs"),
        P.MountEntry("/x", "/", os.makedev(0, 40), "fuse.sshfs", "host:/"),
    ]


def test_read_mounts_reads_this_process_table() -> None:
    assert any(e.mount_point == "/" for e in P.read_mounts())


# --- paths in a mount -----------------------------------------------------------------------


def test_absolute_path_in_a_mount(fake: Fake) -> None:
    t = fake.resolve(fake.mnt / "a" / "f")
    assert t == P.TreePath(fake.mnt, "/a/f", None)
    assert t.target == fake.mnt / "a" / "f"
    assert str(t) == "/a/f"
    assert P.fs_path(t, "n2") == fake.mnt / "..." / "n2" / "a" / "f"


def test_relative_paths_and_spellings_of_the_root(
    fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(fake.root)
    assert fake.resolve("mnt/a/b") == P.TreePath(fake.mnt, "/a/b")
    for spec in ("mnt", "mnt/", "./mnt//", "mnt/.", "mnt/a/..", "other/../mnt"):
        assert fake.resolve(spec) == P.TreePath(fake.mnt, "/"), spec
    monkeypatch.chdir(fake.mnt / "a" / "b")
    assert fake.resolve("x") == P.TreePath(fake.mnt, "/a/b/x")
    assert fake.resolve("../f") == P.TreePath(fake.mnt, "/a/f")
    assert fake.resolve(".") == P.TreePath(fake.mnt, "/a/b")


def test_symlinks_into_the_tree_resolve_but_a_last_component_in_it_is_kept(fake: Fake) -> None:
    (fake.root / "link").symlink_to(fake.mnt)
    assert fake.resolve(fake.root / "link" / "a" / "f") == P.TreePath(fake.mnt, "/a/f")
    assert fake.resolve(fake.root / "link") == P.TreePath(fake.mnt, "/")
    (fake.root / "flink").symlink_to(fake.mnt / "a" / "f")
    assert fake.resolve(fake.root / "flink") == P.TreePath(fake.mnt, "/a/f")
    # A symlink inside the tree: the link itself, unless a trailing slash follows it.
    assert fake.resolve(f"{fake.mnt}/a/lnk").path == "/a/lnk"
    assert fake.resolve(f"{fake.mnt}/a/lnk/").path == "/a/b"
    assert fake.resolve(f"{fake.mnt}/a/lnk/x").path == "/a/b/x"


def test_a_path_that_does_not_exist_yet_resolves(fake: Fake) -> None:
    assert fake.resolve(fake.mnt / "new" / "deeper").path == "/new/deeper"


def test_paths_outside_a_dfs_mount_are_refused(fake: Fake) -> None:
    msg = fake.error(fake.root / "other" / "x")
    assert "not inside a dfs mount" in msg and str(fake.mnt) in msg
    assert "not inside a dfs mount" in fake.error(f"{fake.mnt}/../other")
    assert "empty path" in fake.error("")
    # A FUSE mount of another file system is not dfs.
    sshfs = line(41, fake.root / "other", "fuse.sshfs")
    assert "not inside a dfs mount" in fake.error(fake.root / "other" / "x", sshfs)
    # The last of stacked mounts wins: dfs hidden under another mount is not used.
    over = line(42, fake.mnt, "tmpfs")
    assert "not inside a dfs mount" in fake.error(fake.mnt / "a", over)


def test_a_mount_that_does_not_answer_is_named(fake: Fake) -> None:
    gone = fake.root / "gone"
    entry = line(50, gone, "fuse.dfs", dev="0:9999")
    msg = fake.error(gone / "a", entry)
    assert f"dfs mount {gone} does not answer" in msg and "No such file" in msg
    # Listed with another device than the directory has: not that mount.
    fake.lines[1] = line(40, fake.mnt, "fuse.dfs", dev="0:9999")
    assert "is not the dfs mount listed" in fake.error(fake.mnt / "a")


def test_a_bind_mount_of_a_subtree_maps_into_the_whole_tree(fake: Fake) -> None:
    bind = fake.root / "bind"
    bind.mkdir()
    entry = line(60, bind, "fuse.dfs", root="/a", dev=dev_field(fake.mnt))
    assert fake.resolve(bind / "f", entry) == P.TreePath(fake.mnt, "/a/f")
    assert fake.resolve(bind, entry) == P.TreePath(fake.mnt, "/a")
    fake.lines.pop()  # no mount of the whole tree
    assert "no mount of the whole tree" in fake.error(bind / "f", entry)


# --- host views: MNT/.../HOST/path ----------------------------------------------------------


def test_host_view_paths(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    t = fake.resolve(fake.mnt / "..." / "n2" / "a" / "b")
    assert t == P.TreePath(fake.mnt, "/a/b", "n2")
    assert t.target == fake.mnt / "..." / "n2" / "a" / "b"
    assert str(t) == "/../n2/a/b"
    assert P.fs_path(t, None) == fake.mnt / "a" / "b"
    assert fake.resolve(f"{fake.mnt}/.../n3/") == P.TreePath(fake.mnt, "/", "n3")
    monkeypatch.chdir(fake.mnt)
    assert fake.resolve(".../n1/a/../x") == P.TreePath(fake.mnt, "/x", "n1")
    # Leaving a host's tree by '..' lands in the list of hosts or the tree itself.
    assert "names the list of hosts" in fake.error(".../n1/..")
    assert fake.resolve(".../n1/../..") == P.TreePath(fake.mnt, "/")


def test_host_view_errors(fake: Fake) -> None:
    assert "names the list of hosts" in fake.error(fake.mnt / "...")
    msg = fake.error(fake.mnt / "..." / "n9" / "a")
    assert "unknown host 'n9'" in msg and "n1, n2, n3" in msg


# --- the Newcastle form: /../HOST/path ------------------------------------------------------


def test_newcastle_form_with_a_given_mount(fake: Fake) -> None:
    t = fake.resolve("/../n2/a/b", mount=fake.mnt)
    assert t == P.TreePath(fake.mnt, "/a/b", "n2")
    assert t.target == fake.mnt / "..." / "n2" / "a" / "b"
    assert str(t) == "/../n2/a/b"
    assert fake.resolve(Path("/../n2/a/b"), mount=str(fake.mnt)) == t
    for spec, path in [
        ("/../n3", "/"),
        ("/../n3/", "/"),
        ("/../n3//a///b/", "/a/b"),
        ("/../n3/a/./b/../c", "/a/c"),
        ("/../n3/a/..", "/"),
    ]:
        assert fake.resolve(spec, mount=fake.mnt) == P.TreePath(fake.mnt, path, "n3"), spec


def test_newcastle_form_errors(fake: Fake) -> None:
    m = {"mount": fake.mnt}
    assert "no host after /../" in fake.error("/..", **m)
    assert "no host after /../" in fake.error("/../", **m)
    assert "no host after /../" in fake.error("/..//a", **m)
    assert "not a host name" in fake.error("/../../n2/a", **m)
    assert "not a host name" in fake.error("/.././n2", **m)
    assert "'..' leaves the tree of host n2" in fake.error("/../n2/..", **m)
    assert "'..' leaves the tree of host n2" in fake.error("/../n2/a/../../b", **m)
    msg = fake.error("/../n9/a", **m)
    assert "unknown host 'n9'" in msg and "n1, n2, n3" in msg


def test_names_that_only_look_like_the_newcastle_form(fake: Fake) -> None:
    # "/..x" is a name in "/", not the super-root; "/..." is not a mount.
    assert "not inside a dfs mount" in fake.error("/..x/n2", mount=fake.mnt)
    assert "not inside a dfs mount" in fake.error("/.../n2", mount=fake.mnt)
    assert "not inside a dfs mount" in fake.error("/..../n2", mount=fake.mnt)


def test_which_mount_the_newcastle_form_uses(fake: Fake) -> None:
    second = fake.root / "mnt2"
    (second / "..." / "n2").mkdir(parents=True)
    two = line(41, second, "fuse.dfs")
    # The only dfs mount.
    assert fake.resolve("/../n2/a").mount == fake.mnt
    # $DFS_MOUNT, and --mount before it.
    env = {"DFS_MOUNT": str(second)}
    assert fake.resolve("/../n2/a", two, env=env).mount == second
    assert fake.resolve("/../n2/a", two, env=env, mount=f"{fake.mnt}/").mount == fake.mnt
    assert fake.resolve("/../n2/a", two, env={"DFS_MOUNT": ""}, mount=second).mount == second
    # Several, or none: say which and how to choose.
    msg = fake.error("/../n2/a", two)
    assert "there are several" in msg and str(fake.mnt) in msg and str(second) in msg
    assert "--mount" in msg and "DFS_MOUNT" in msg
    fake.lines.pop()
    assert "there is none here" in fake.error("/../n2/a")
    # The spelling is checked before a mount is looked for.
    assert "no host after" in fake.error("/..//a")


def test_a_mount_option_must_name_a_dfs_mount_point(fake: Fake) -> None:
    msg = fake.error("/../n2/a", mount=fake.mnt / "a")
    assert "--mount" in msg and "not a dfs mount point" in msg and str(fake.mnt) in msg
    assert "not a dfs mount" in fake.error("/../n2/a", mount=fake.root / "other")
    msg = fake.error("/../n2/a", env={"DFS_MOUNT": str(fake.root / "other")})
    assert msg.startswith("DFS_MOUNT ") and "not a dfs mount" in msg
    # A symlink to the mount point is that mount point.
    (fake.root / "link").symlink_to(fake.mnt)
    assert fake.resolve("/../n2", mount=fake.root / "link").mount == fake.mnt


def test_a_mount_without_host_views_is_named(fake: Fake) -> None:
    shutil.rmtree(fake.mnt / "...")
    msg = fake.error("/../n2/a", mount=fake.mnt)
    assert "cannot list the hosts" in msg and "No such file" in msg


def test_the_error_is_a_click_usage_error() -> None:
    assert issubclass(P.TreePathError, click.UsageError)
    assert str(P.TreePathError("why")) == "why"


# --- dfs where: comparison ------------------------------------------------------------------


def ok(node: str, **kw: object) -> W.Copy:
    base: dict[str, object] = {
        "kind": "file",
        "size": 6,
        "mode": 0o644,
        "uid": 0,
        "gid": 0,
        "mtime_ns": MTIME,
        "nlink": 1,
        "digest": "00ff",
    }
    base.update(kw)
    return W.Copy(node, "ok", **base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("copies", "odd"),
    [
        ([ok("n1"), ok("n2"), ok("n3")], set()),
        ([ok("n1"), ok("n2", digest="11"), ok("n3")], {"n2"}),
        ([ok("n1"), ok("n2", mtime_ns=1), ok("n3", mtime_ns=1)], {"n1"}),
        ([ok("n1"), ok("n2", mode=0o600), ok("n3")], {"n2"}),
        ([ok("n1"), ok("n2", uid=7), ok("n3")], {"n2"}),
        ([ok("n1"), ok("n2", nlink=2), ok("n3")], {"n2"}),
        ([ok("n1"), ok("n2"), W.Copy("n3", "missing")], {"n3"}),
        ([ok("n1"), W.Copy("n2", "missing"), W.Copy("n3", "missing")], {"n1"}),
        ([ok("n1"), ok("n2"), W.Copy("n3", "unreachable", "Host is down")], set()),
        ([ok("n1"), ok("n2", digest="11"), W.Copy("n3", "unreachable", "x")], {"n1", "n2"}),
        ([ok("n1"), ok("n2", size=7), ok("n3", size=8)], {"n1", "n2", "n3"}),
        ([ok("n1"), ok("n2"), W.Copy("n3", "error", "Input/output error")], {"n3"}),
        ([ok("n2")], set()),
        ([W.Copy("n1", "unreachable", "x")], set()),
    ],
)
def test_odd_ones_are_those_not_of_the_majority(copies: list[W.Copy], odd: set[str]) -> None:
    assert W.odd_ones(copies) == odd


def fake_probe(copies: dict[str, W.Copy]) -> W.Probe:
    def probe(path: Path, node: str) -> W.Copy:
        assert path.parts[-3:] == ("...", node, "f")
        return copies[node]

    return probe


def test_survey_flags_and_says_why(fake: Fake) -> None:
    tree = P.TreePath(fake.mnt, "/f")
    copies = {
        "n1": ok("n1"),
        "n2": ok("n2", digest="beef"),
        "n3": ok("n3"),
    }
    r = W.survey("x/f", tree, HOSTS, probe=fake_probe(copies))
    assert r.differs == {"n2"} and not r.same
    text = W.report_lines(r)
    (n2,) = [ln for ln in text if ln.strip().startswith("n2")]
    assert "xxh3:beef" in n2 and n2.endswith("<- DIFFERS")
    assert not any("DIFFERS" in ln for ln in text if ln.strip().startswith(("n1", "n3")))
    assert text[-1].strip() == "NOT THE SAME: differs from the majority: n2"
    doc = W.report_json(r)
    assert [c["differs"] for c in doc["copies"]] == [False, True, False]


def test_survey_of_an_unreachable_node(fake: Fake) -> None:
    tree = P.TreePath(fake.mnt, "/f")
    copies = {"n1": ok("n1"), "n2": ok("n2"), "n3": W.Copy("n3", "unreachable", "Host is down")}
    r = W.survey("f", tree, HOSTS, probe=fake_probe(copies))
    assert not r.differs and not r.same
    text = W.report_lines(r)
    assert any(ln.split() == ["n3", "unreachable", "(Host", "is", "down)"] for ln in text)
    assert text[-1].strip() == "same on n1, n2; unreachable: n3"
    copies["n1"] = W.Copy("n1", "missing")
    r = W.survey("f", tree, HOSTS, probe=fake_probe(copies))
    assert r.differs == {"n1", "n2"}
    assert W.report_lines(r)[-1].strip() == (
        "NOT THE SAME: differs from the majority: n1, n2; unreachable: n3"
    )


# --- dfs where through its CLI, on a fake mount ---------------------------------------------


def put(fake: Fake, host: str, name: str, data: bytes, mode: int = 0o644) -> Path:
    p = fake.mnt / "..." / host / name
    p.write_bytes(data)
    p.chmod(mode)
    os.utime(p, ns=(MTIME, MTIME))
    return p


def run_where(fake: Fake, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    info = fake.root / "mountinfo"
    info.write_text("\n".join(fake.lines) + "\n")
    monkeypatch.setattr(dfs.mounts, "MOUNTINFO", info)
    monkeypatch.delenv("DFS_MOUNT", raising=False)
    r = CliRunner().invoke(main, ["where", *args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def digest(data: bytes) -> str:
    return str(xxhash.xxh3_64(data).hexdigest())


def test_where_same_everywhere(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # more than one 1 MiB chunk
    for host in HOSTS:
        put(fake, host, "f", data)
    code, out, err = run_where(fake, monkeypatch, str(fake.mnt / "f"))
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0] == f"/f  (through {fake.mnt})"
    assert lines[1].split() == list(W.HEADER)
    owner = f"{os.getuid()}:{os.getgid()}"
    for host, row in zip(HOSTS, lines[2:5], strict=True):
        assert row.split() == [
            host,
            "file",
            str(len(data)),
            "0644",
            owner,
            str(MTIME),
            "1",
            f"xxh3:{digest(data)}",
        ]
    assert out.splitlines()[-1].strip() == "same on all 3 nodes"


def test_where_flags_a_copy_that_differs(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    for host in HOSTS:
        put(fake, host, "f", b"same\n" if host != "n3" else b"SAME\n")
    code, out, _ = run_where(fake, monkeypatch, "--json", str(fake.mnt / "f"))
    assert code == 1
    (doc,) = json.loads(out)
    assert doc["tree_path"] == "/f" and doc["host"] is None and doc["same"] is False
    assert doc["mount"] == str(fake.mnt)
    by = {c["node"]: c for c in doc["copies"]}
    assert [by[h]["differs"] for h in HOSTS] == [False, False, True]
    assert by["n1"]["digest"] == digest(b"same\n") and by["n3"]["digest"] == digest(b"SAME\n")
    assert by["n1"]["mode"] == 0o644 and by["n1"]["mode_octal"] == "0644"
    assert by["n1"]["mtime_ns"] == MTIME and by["n1"]["type"] == "file"


def test_where_missing_symlinks_and_directories(
    fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    for host in HOSTS:
        os.symlink("target", fake.mnt / "..." / host / "l")
        for p in (fake.mnt / "..." / host / "l", fake.mnt / "..." / host / "a"):
            os.utime(p, ns=(MTIME, MTIME), follow_symlinks=False)
        if host != "n2":
            put(fake, host, "only", b"x")
    code, out, _ = run_where(fake, monkeypatch, "--json", *(str(fake.mnt / n) for n in ["l", "a"]))
    assert code == 0
    link, a = json.loads(out)
    assert {c["digest"] for c in link["copies"]} == {digest(b"target")}
    assert {c["type"] for c in link["copies"]} == {"symlink"}
    # Directories: digest of the sorted names, with the entry count.
    assert {c["entries"] for c in a["copies"]} == {0} and {c["size"] for c in a["copies"]} == {None}
    code, out, _ = run_where(fake, monkeypatch, str(fake.mnt / "only"), str(fake.mnt / "..."))
    assert code == 2
    code, out, _ = run_where(fake, monkeypatch, str(fake.mnt / "only"), str(fake.mnt / "nowhere"))
    assert code == 1
    first, second = out.split("\n\n")
    assert first.splitlines()[-1].strip() == "NOT THE SAME: differs from the majority: n2"
    assert [ln.split()[:2] for ln in first.splitlines() if "n2" in ln.split()[:1]] == [
        ["n2", "missing"]
    ]
    assert second.splitlines()[-1].strip() == "NOT THE SAME: missing: n1, n2, n3"


def test_where_directory_digest_is_of_the_sorted_names(
    fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    for host in HOSTS:
        for name in ("b", "a", "c") if host != "n1" else ("a", "b"):
            (fake.mnt / "..." / host / "a" / name).mkdir()
    code, out, _ = run_where(fake, monkeypatch, "--json", str(fake.mnt / "a"))
    assert code == 1
    (doc,) = json.loads(out)
    by = {c["node"]: c for c in doc["copies"]}
    assert by["n2"]["digest"] == digest(b"a\0b\0c\0") and by["n2"]["entries"] == 3
    assert by["n1"]["entries"] == 2 and by["n1"]["differs"]


def test_where_newcastle_form_shows_one_node(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    put(fake, "n2", "f", b"two")
    code, out, _ = run_where(fake, monkeypatch, "/../n2/f")  # the only dfs mount
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("/../n2/f  (through ")
    assert [ln.split()[0] for ln in lines[2:-1]] == ["n2"]
    assert lines[-1].strip() == "stored on n2"
    code, out, _ = run_where(fake, monkeypatch, "--json", "--mount", str(fake.mnt), "/../n1/f")
    assert code == 1
    (doc,) = json.loads(out)
    assert doc["host"] == "n1" and [c["state"] for c in doc["copies"]] == ["missing"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["/../n9/f"], "unknown host 'n9'"),
        (["/..//f"], "no host after"),
        (["/../n1/.."], "leaves the tree of host n1"),
        (["/tmp"], "not inside a dfs mount"),
        (["--mount", "/tmp", "/../n1/f"], "--mount /tmp: not a dfs mount"),
    ],
)
def test_where_usage_errors_exit_2(
    fake: Fake, monkeypatch: pytest.MonkeyPatch, args: Sequence[str], says: str
) -> None:
    code, out, err = run_where(fake, monkeypatch, *args)
    assert code == 2 and not out
    assert err.startswith("dfs where: ") and says in err


def test_where_help_documents_exit_codes(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_where(fake, monkeypatch, "--help")
    assert code == 0
    assert "Exit codes:" in out and "/../n2/a/b" in out and "--mount" in out
    code, _, err = run_where(fake, monkeypatch)
    assert code == 2 and "Missing argument" in err
