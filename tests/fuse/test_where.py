"""``dfs where`` on a real 3-node cluster: each node's copy of a path, read through host views.

One module-scoped cluster (``dfs cluster up``, always brought down); each test
works in a fresh directory of the tree and runs ``python -m dfs_tools where``
as a user would: every spelling of a path (a path in a mount, relative or
absolute, ``MNT/.../HOST/path``, ``/../HOST/path`` with ``--mount`` or
``DFS_MOUNT``), ``--json``, a missing path, and a killed node (unreachable,
exit 1; restarted at the end). Copies that differ are tested in
tests/unit/test_paths.py: a replica cannot be changed through the mount.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from tests.fuse.clusters import DFS, Launcher, module_cluster
from tests.waiting import wait_until

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

NODES = ("n1", "n2", "n3")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    yield from module_cluster(tmp_path_factory, "where")


@pytest.fixture
def top(cluster: Launcher, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh directory /NAME of the tree for this test (made on n1); yields NAME."""
    name = request.node.name.replace("[", "_").replace("]", "")
    (mount(cluster, "n1") / name).mkdir()
    yield name
    bugs = cluster.bugs()
    if bugs:
        print(cluster.logs())
    assert not bugs, "a daemon logged unexpected exceptions:\n" + "\n".join(bugs)


def mount(cluster: Launcher, node: str) -> Path:
    return cluster.root / node / "mnt"


def where(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "DFS_MOUNT"}
    full_env.update(env or {})
    return subprocess.run(
        [*DFS, "where", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=full_env,
        stdin=subprocess.DEVNULL,
    )


def where_json(*args: str | Path, **kw: Any) -> tuple[int, list[dict[str, Any]]]:
    r = where("--json", *args, **kw)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert isinstance(doc, list)
    return r.returncode, doc


def copies(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["node"]: c for c in report["copies"]}


def digest(data: bytes) -> str:
    return str(xxhash.xxh3_64(data).hexdigest())


def test_a_file_written_on_one_node_is_the_same_on_all(cluster: Launcher, top: str) -> None:
    data = os.urandom(2 * (1 << 20) + 4321)
    (mount(cluster, "n2") / top / "f").write_bytes(data)
    os.chmod(mount(cluster, "n2") / top / "f", 0o640)
    os.symlink("f", mount(cluster, "n3") / top / "l")
    os.mkdir(mount(cluster, "n3") / top / "d")
    (mount(cluster, "n1") / top / "d" / "x").write_text("x")
    f, link, d = (mount(cluster, "n1") / top / n for n in ("f", "l", "d"))
    code, (rf, rl, rd) = where_json(f, link, d)
    assert code == 0
    assert rf["tree_path"] == f"/{top}/f" and rf["host"] is None and rf["same"]
    assert rf["mount"] == str(mount(cluster, "n1"))
    st = os.lstat(f)
    for node, c in copies(rf).items():
        assert (c["state"], c["type"], c["size"], c["mode"]) == ("ok", "file", len(data), 0o640)
        assert c["digest"] == digest(data), node
        assert (c["uid"], c["gid"], c["mtime_ns"], c["nlink"]) == (
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
            1,
        ), node
        assert not c["differs"]
    assert sorted(copies(rf)) == list(NODES)
    assert {(c["type"], c["digest"]) for c in rl["copies"]} == {("symlink", digest(b"f"))}
    assert {(c["type"], c["digest"], c["entries"]) for c in rd["copies"]} == {
        ("dir", digest(b"x\0"), 1)
    }
    # The text form, from a relative path on another node's mount.
    r = where(f"{top}/f", cwd=mount(cluster, "n3"))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"/{top}/f  (through {mount(cluster, 'n3')})"
    assert [ln.split()[0] for ln in lines[2:5]] == list(NODES)
    assert all(f"xxh3:{digest(data)}" in ln for ln in lines[2:5])
    assert lines[-1].strip() == "same on all 3 nodes"


def test_one_nodes_copy_by_the_newcastle_form(cluster: Launcher, top: str) -> None:
    (mount(cluster, "n3") / top / "f").write_text("hello\n")
    n1 = mount(cluster, "n1")
    cases: list[tuple[list[str | Path], dict[str, str] | None]] = [
        (["--mount", n1], None),
        ([], {"DFS_MOUNT": str(n1)}),
        (["--mount", f"{n1}/"], {"DFS_MOUNT": "/nonexistent"}),  # --mount comes first
    ]
    for args, env in cases:
        code, (report,) = where_json(*args, f"/../n2/{top}/f", env=env)
        assert code == 0
        assert (report["host"], report["tree_path"], report["mount"]) == (
            "n2",
            f"/{top}/f",
            str(n1),
        )
        (c,) = report["copies"]
        assert (c["node"], c["state"], c["digest"]) == ("n2", "ok", digest(b"hello\n"))
    # The same through the host view of a mount.
    code, (report,) = where_json(mount(cluster, "n2") / "..." / "n3" / top / "f")
    assert code == 0 and [c["node"] for c in report["copies"]] == ["n3"]
    r = where("--mount", n1, f"/../n1/{top}/f")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"/../n1/{top}/f  (through {n1})"
    assert r.stdout.splitlines()[-1].strip() == "stored on n1"


def test_a_missing_path(cluster: Launcher, top: str) -> None:
    n2 = mount(cluster, "n2")
    code, (report,) = where_json(n2 / top / "absent")
    assert code == 1 and not report["same"]
    assert {c["node"]: c["state"] for c in report["copies"]} == dict.fromkeys(NODES, "missing")
    code, (report,) = where_json("--mount", n2, f"/../n3/{top}/absent/deeper")
    assert code == 1 and [c["state"] for c in report["copies"]] == ["missing"]
    r = where(n2 / top / "absent")
    assert r.returncode == 1
    assert r.stdout.splitlines()[-1].strip() == "NOT THE SAME: missing: n1, n2, n3"


def test_usage_errors_exit_2(cluster: Launcher, top: str) -> None:
    n1 = mount(cluster, "n1")
    errors: list[tuple[list[str | Path], str]] = [
        (["--mount", n1, f"/../n9/{top}"], "unknown host 'n9' (hosts: n1, n2, n3)"),
        (["--mount", n1, f"/../n1/{top}/../.."], "'..' leaves the tree of host n1"),
        (["--mount", n1 / top, f"/../n1/{top}"], "not a dfs mount point"),
        ([n1 / "..." / "n7" / top], "unknown host 'n7'"),
        ([cluster.root], "not inside a dfs mount"),
    ]
    for args, says in errors:
        r = where(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert says in r.stderr and not r.stdout, (args, r.stderr)


def test_a_stopped_node_is_unreachable(cluster: Launcher, top: str) -> None:
    n1 = mount(cluster, "n1")
    (n1 / top / "f").write_text("kept")
    r = cluster.dfs("stop", "n3", "--kill")
    assert r.returncode == 0, r.stderr
    try:
        code, (report,) = where_json(n1 / top / "f")  # answers (within its timeout)
        assert code == 1 and not report["same"]
        by = copies(report)
        assert by["n1"]["state"] == by["n2"]["state"] == "ok"
        assert by["n3"]["state"] == "unreachable" and by["n3"]["error"], by["n3"]
        assert not any(c["differs"] for c in report["copies"])
        r = where(n1 / top / "f")
        assert r.returncode == 1
        (row,) = [ln for ln in r.stdout.splitlines() if ln.split()[:1] == ["n3"]]
        assert row.split()[1] == "unreachable" and "(" in row
        assert r.stdout.splitlines()[-1].strip() == "same on n1, n2; unreachable: n3"
        code, (report,) = where_json("--mount", n1, f"/../n3/{top}/f")
        assert code == 1 and [c["state"] for c in report["copies"]] == ["unreachable"]
        # A path in the dead node's own (stale) mount: its mount does not answer.
        r = where(mount(cluster, "n3") / top / "f")
        assert r.returncode == 2 and "does not answer" in r.stderr, r.stderr
    finally:
        r = cluster.dfs("start", "n3")
        assert r.returncode == 0, r.stdout + r.stderr
    # Back to normal: n1 reaches n3 again (within a few heartbeats).
    wait_until(
        "dfs where to find n3's copy again",
        lambda: where(n1 / top / "f"),
        ok=lambda r: r.returncode == 0,
        every=0.2,
    )
