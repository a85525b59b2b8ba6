"""Volumes: a second volume with its own primary and sites, seen from every node.

A 4-node cluster (root volume: primary n1, sites n1..n3; n4 stores no replica of
it and reads it from n1) with the volume ``/proj`` made by ``dfs volume create``
(primary n2, sites n2 and n3): n1 and n4 store no replica of it and read it from
n2. Shell workloads run on each kind of node and the trees are compared through
every mount; then what volumes add: EXDEV across them, EBUSY on a mount point,
the per-host views, the errors of
``dfs volume create``, a storage site of the volume killed mid-workload, the
volume's primary restarted, and fsck of every node's store.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuse.clusters import (
    DFS,
    SOURCES,
    Launcher,
    assert_same_everywhere,
    launched,
    run,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

NODES = ("n1", "n2", "n3", "n4")


def dfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DFS, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    root = tmp_path_factory.mktemp("vol") / "c"
    with launched(root, nodes=4, show_logs=lambda: False) as launcher:
        r = launcher.up(nodes=4)
        assert r.returncode == 0, r.stdout + r.stderr + launcher.logs()
        (root / "n1" / "mnt" / "proj").mkdir()
        r = dfs(
            "volume", "create", str(root / "n3" / "mnt" / "proj"), "--primary", "n2",
            "--sites", "n3", "--json",
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr + launcher.logs()
        made = json.loads(r.stdout)
        assert made["path"] == "/proj" and made["primary"] == "n2"
        assert made["sites"] == ["n2", "n3"]  # the primary is always a site
        yield launcher


def mnt(cluster: Launcher, node: str) -> Path:
    return cluster.root / node / "mnt"


@pytest.fixture
def vdirs(cluster: Launcher, request: pytest.FixtureRequest) -> Iterator[dict[str, Path]]:
    """Each node's view of one fresh directory of /proj (made on n1, which stores none)."""
    name = request.node.name.replace("[", "_").replace("]", "")
    (mnt(cluster, "n1") / "proj" / name).mkdir()
    yield {n: mnt(cluster, n) / "proj" / name for n in NODES}
    bugs = cluster.bugs()
    assert not bugs, "a daemon logged unexpected exceptions:\n" + "\n".join(bugs)


def test_volume_list_on_every_node(cluster: Launcher) -> None:
    roles = {"n1": "none", "n2": "primary", "n3": "site", "n4": "none"}
    root_roles = {"n1": "primary", "n2": "site", "n3": "site", "n4": "none"}
    for node in NODES:
        r = dfs("volume", "list", str(mnt(cluster, node)), "--json")
        assert r.returncode == 0, r.stderr
        vols = {v["path"]: v for v in json.loads(r.stdout)}
        assert set(vols) == {"/", "/proj"}
        assert vols["/"]["primary"] == "n1"
        assert vols["/"]["role"] == root_roles[node]
        assert vols["/proj"]["role"] == roles[node]
        text = dfs("volume", "list", str(mnt(cluster, node))).stdout
        assert "/proj" in text and "n2,n3" in text
    # The Newcastle form names the tree as well.
    r = dfs("volume", "list", "/../n2/proj", "--mount", str(mnt(cluster, "n3")))
    assert r.returncode == 0 and "/proj" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("origin", ["n1", "n2", "n3", "n4"])
def test_workload_in_a_volume_is_seen_on_every_node(vdirs: dict[str, Path], origin: str) -> None:
    """n1 and n4 store nothing of /proj (every operation goes to n2), n2 orders it, n3 stores
    it; n4 does not store the root volume either."""
    run(
        f"mkdir tree && cp -a {SOURCES} tree/ && "
        "mkdir -p t2 && tar cf - -C tree . | tar xf - -C t2 && "
        "ln t2/$(ls t2 | head -1) hard 2>/dev/null || true; "
        "ln -s tree/../t2 sym && printf 'hello\\n' > f && chmod 640 f && "
        "chown 65534:65534 f && setfattr -n user.colour -v blue f && "
        "touch -d '2001-02-03 04:05:06.789' f && mkfifo fifo && "
        "dd if=/dev/urandom of=big bs=64K count=37 status=none && "
        "truncate -s 10M sparse && echo tail >> sparse && sed -i s/hello/bye/ f",
        vdirs[origin],
    )
    want = assert_same_everywhere(vdirs, origin)
    assert want["f"][-1] == b"bye\n" and want["f"][1] == 65534
    # Contents read on the node without a replica equal the source tree.
    for sub in ("json/decoder.py", "email/message.py"):
        src = Path(SOURCES.split()[0]).parent / sub
        assert (vdirs["n1"] / "tree" / sub).read_bytes() == src.read_bytes()


def test_a_node_without_a_root_replica_works_in_the_root_volume(cluster: Launcher) -> None:
    """n4 stores nothing of the root volume: its reads go to n1, its updates too."""
    top = {n: mnt(cluster, n) / "rootwork" for n in NODES}
    top["n4"].mkdir()
    try:
        run(
            f"cp -a {SOURCES} . && ln -s json link && printf 'x\\n' > f && chmod 600 f && "
            "mv f g && setfattr -n user.k -v v g",
            top["n4"],
        )
        assert_same_everywhere(top, "n4")
        assert not (mnt(cluster, "n1") / "..." / "n4" / "rootwork").exists()
    finally:
        run("rm -rf rootwork", mnt(cluster, "n2"))


def test_changes_elsewhere_show_on_the_node_without_a_replica(vdirs: dict[str, Path]) -> None:
    """n1 caches /proj briefly (1 s) instead of being told: a change on n3 shows soon."""
    f = vdirs["n1"] / "f"
    f.write_text("one")
    assert f.read_text() == "one"
    (vdirs["n3"] / "f").write_text("two, longer")
    (vdirs["n3"] / "new").write_text("x")
    # Within its 1 s attribute cache; the deadline is wait_until's (not a latency bound).
    wait_until(
        "n3's changes to show on n1",
        lambda: (f.read_text(), (vdirs["n1"] / "new").exists()),
        ok=("two, longer", True).__eq__,
    )
    assert os.stat(f).st_size == len("two, longer")
    # An open file keeps reading after its name is removed elsewhere (POSIX), on n1 too.
    with open(f, "rb") as held:
        (vdirs["n2"] / "f").unlink()
        wait_until("n2's unlink to show on n1", f.exists, ok=lambda there: not there)
        assert held.read() == b"two, longer"


def test_nothing_crosses_a_volume_boundary(cluster: Launcher, vdirs: dict[str, Path]) -> None:
    top = mnt(cluster, "n1")
    (top / "outside").write_text("root volume")
    try:
        for node in NODES:
            inside = vdirs[node] / "moved"
            with pytest.raises(OSError) as e:
                os.rename(mnt(cluster, node) / "outside", inside)
            assert e.value.errno == errno.EXDEV
            with pytest.raises(OSError) as e:
                os.link(mnt(cluster, node) / "outside", inside)
            assert e.value.errno == errno.EXDEV
            # The mount point itself stays where it is.
            for call in (
                lambda m: os.rmdir(m / "proj"),
                lambda m: os.rename(m / "proj", m / "proj2"),
                lambda m: os.rename(m / "outside", m / "proj"),
            ):
                with pytest.raises(OSError) as e:
                    call(mnt(cluster, node))
                assert e.value.errno in (errno.EBUSY, errno.EISDIR, errno.ENOTEMPTY)
        # mv copies across volumes, as between file systems.
        run(f"mv {top / 'outside'} {vdirs['n1'] / 'moved'}", top)
        assert (vdirs["n3"] / "moved").read_text() == "root volume"
        assert not (mnt(cluster, "n2") / "outside").exists()
    finally:
        (top / "outside").unlink(missing_ok=True)


def test_host_views_show_who_stores_the_volume(cluster: Launcher, vdirs: dict[str, Path]) -> None:
    (vdirs["n1"] / "f").write_text("stored on n2 and n3")
    name = vdirs["n1"].name
    view = mnt(cluster, "n1") / "..."
    for host in ("n2", "n3"):
        assert (view / host / "proj" / name / "f").read_text() == "stored on n2 and n3"
        assert "proj" in os.listdir(view / host)
    assert not (view / "n1" / "proj").exists()  # n1 holds no replica of /proj
    assert "proj" not in os.listdir(view / "n1")
    with pytest.raises(FileNotFoundError):
        (view / "n1" / "proj" / name / "f").read_text()


def test_volume_create_refuses_what_it_cannot_do(cluster: Launcher) -> None:
    top = mnt(cluster, "n2")
    (top / "full").mkdir(exist_ok=True)
    (top / "full" / "x").write_text("x")
    (top / "file").write_text("x")
    (top / "empty").mkdir(exist_ok=True)
    (top / "proj" / "inner").mkdir(exist_ok=True)
    cases = {
        str(top / "full"): "not empty",
        str(top / "file"): "not a directory",
        str(top / "proj"): "mounted there",
        str(top / "proj" / "inner"): "cannot be nested",
        str(top / "missing"): "",
        "/tmp": "not inside a dfs mount",
    }
    try:
        for path, words in cases.items():
            r = dfs("volume", "create", path, "--primary", "n3")
            assert r.returncode != 0, f"{path}: {r.stdout}"
            assert words.lower() in (r.stdout + r.stderr).lower(), f"{path}: {r.stderr}"
        r = dfs("volume", "create", str(top / "empty"), "--primary", "n9")
        assert r.returncode == 1 and "unknown node" in r.stderr
        r = dfs("volume", "list", str(top), "--json")
        assert {v["path"] for v in json.loads(r.stdout)} == {"/", "/proj"}
    finally:
        run("rm -rf full file empty proj/inner", top)


def test_a_two_site_volume_refuses_updates_with_a_site_killed_and_loses_nothing(
    cluster: Launcher, vdirs: dict[str, Path]
) -> None:
    """/proj has two sites (n2, n3): an update needs both (a majority of two). SIGKILL n3
    while n1 writes there: writes fail (EROFS at once, or ETIMEDOUT for the one in flight)
    instead of going on with one copy; every acknowledged write is kept; n3 restarts,
    catches up, and writes work again."""
    top = vdirs["n1"]
    acked: list[str] = []
    for i in range(20):
        (top / f"f{i:02d}").write_bytes(os.urandom(1000 + i))
        acked.append(f"f{i:02d}")
    r = cluster.dfs("stop", "n3", "--kill")
    assert r.returncode == 0, r.stderr

    def refused() -> bool:
        try:
            (top / "while-n3-is-down").write_text("x")
        except OSError as exc:
            assert exc.errno in (errno.EROFS, errno.ETIMEDOUT), exc
            return exc.errno == errno.EROFS
        return False

    wait_until("updates of /proj refused without n3", refused)
    (mnt(cluster, "n1") / "root-file").write_text("the root volume (3 sites) goes on")
    (mnt(cluster, "n1") / "root-file").unlink()
    r = cluster.dfs("start", "n3")
    assert r.returncode == 0, r.stdout + r.stderr
    wait_until("updates of /proj again", lambda: _writes(top / "after"))
    want = assert_same_everywhere(vdirs, "n2")
    assert set(acked) <= set(want)


def _writes(path: Path) -> bool:
    try:
        path.write_text("y")
        return True
    except OSError as exc:
        assert exc.errno in (errno.EROFS, errno.ETIMEDOUT), exc
        return False


def test_volume_primary_restarts_with_everything(cluster: Launcher, vdirs: dict[str, Path]) -> None:
    (vdirs["n3"] / "kept").write_text("kept across a restart of n2")
    r = cluster.dfs("stop", "n2")
    assert r.returncode == 0, r.stderr
    try:
        # Without its primary the volume refuses updates at once (EROFS, not a timeout);
        # the root volume goes on.
        with pytest.raises(OSError) as e:
            (vdirs["n3"] / "new").write_text("x")
        assert e.value.errno == errno.EROFS
        assert (vdirs["n3"] / "kept").read_text() == "kept across a restart of n2"
        # A node that stores no replica cannot read the volume now: a clear error (at once,
        # or after timeouts.call), not a hang.
        with pytest.raises(OSError) as e:
            (vdirs["n4"] / "kept").read_text()
        assert e.value.errno in (errno.EHOSTDOWN, errno.ETIMEDOUT)
        (mnt(cluster, "n3") / "root-file").write_text("root volume still takes updates")
    finally:
        r = cluster.dfs("start", "n2")
        assert r.returncode == 0, r.stdout + r.stderr
    (mnt(cluster, "n3") / "root-file").unlink()
    for node in NODES:
        assert (vdirs[node] / "kept").read_text() == "kept across a restart of n2"
    (vdirs["n1"] / "after").write_text("y")
    assert (vdirs["n3"] / "after").read_text() == "y"


def test_a_host_without_the_root_volume_shows_the_volumes_it_stores(cluster: Launcher) -> None:
    """n4 stores no root replica; ``.../n4`` still leads to a volume n4 stores, through
    synthetic directories along its path, on every node (n4's own view included)."""
    (mnt(cluster, "n1") / "deep" / "er").mkdir(parents=True)
    r = dfs(
        "volume", "create", str(mnt(cluster, "n2") / "deep" / "er"), "--primary", "n4",
        "--sites", "n3", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (mnt(cluster, "n2") / "deep" / "er" / "f").write_text("on n4\n")
    for viewer in NODES:
        h = mnt(cluster, viewer) / "..." / "n4"
        assert os.listdir(h) == ["deep"]  # not proj, not the root volume's other names
        assert os.listdir(h / "deep") == ["er"]
        st = os.stat(h / "deep")
        assert stat.S_ISDIR(st.st_mode) and st.st_mode & 0o777 == 0o555
        assert (h / "deep" / "er" / "f").read_text() == "on n4\n"
        assert not (h / "proj").exists() and not (h / "deep" / "x").exists()
        with pytest.raises(OSError) as e:
            (h / "deep" / "x").write_text("n4 stores no replica of /deep")
        assert e.value.errno == errno.EPERM
        # The hosts that store the root volume show /deep as it is.
        assert "proj" in os.listdir(mnt(cluster, viewer) / "..." / "n3")
    # Writes through the view land in the tree, as everywhere else.
    (mnt(cluster, "n1") / "..." / "n4" / "deep" / "er" / "g").write_text("via the view")
    assert (mnt(cluster, "n3") / "deep" / "er" / "g").read_text() == "via the view"
    assert (mnt(cluster, "n1") / "..." / "n3" / "deep" / "er" / "g").read_text() == "via the view"


def test_every_store_checks_clean(cluster: Launcher) -> None:
    """Offline fsck of each node's store: volume roots are not lost directories."""
    for node in ("n3", "n4", "n1", "n2"):
        r = cluster.dfs("stop", node)
        assert r.returncode == 0, r.stderr
        try:
            got = dfs("fsck", "--data", str(cluster.root / node / "data"))
            assert got.returncode == 0, got.stdout + got.stderr
        finally:
            r = cluster.dfs("start", node)
            assert r.returncode == 0, r.stdout + r.stderr
