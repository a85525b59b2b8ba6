"""One tree on three nodes: updates made through one mount, checked through the others.

A 3-node cluster on loopback (``dfs cluster up``; n1 is the root volume's
primary, n2 and n3 storage sites) with real mounts. Shell workloads run on one
node and the trees seen through the other mounts are compared entry by entry:
names, type, mode, owner, size, times, link counts, inode numbers, xattrs,
symlink targets and contents. Then the parts where nodes interact:
concurrent creates of one name, renames seen atomically, the kernel caches
of other nodes invalidated, a storage site killed with SIGKILL mid-workload
and restarted, an unreachable primary refusing updates, and locks: flock/fcntl hold
only on the node that took them, lock files (O_EXCL, mkdir) on every node.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fuse.clusters import (
    SOURCES,
    Launcher,
    assert_same_everywhere,
    module_cluster,
    run,
    writes_while_a_site_is_killed,
)
from tests.waiting import next_file_time, wait_until

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

NODES = ("n1", "n2", "n3")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    yield from module_cluster(tmp_path_factory, "cl")


@pytest.fixture
def mnts(cluster: Launcher, request: pytest.FixtureRequest) -> Iterator[dict[str, Path]]:
    """Each node's view of one fresh directory (made on the primary) for this test."""
    name = request.node.name.replace("[", "_").replace("]", "")
    (cluster.root / "n1" / "mnt" / name).mkdir()
    yield {n: cluster.root / n / "mnt" / name for n in NODES}
    bugs = cluster.bugs()
    if bugs:
        print(cluster.logs())
    assert not bugs, "a daemon logged unexpected exceptions:\n" + "\n".join(bugs)


@pytest.mark.parametrize("origin", ["n1", "n2"])
def test_shell_workload_is_seen_on_every_node(mnts: dict[str, Path], origin: str) -> None:
    here = mnts[origin]
    run(
        f"mkdir tree && cp -a {SOURCES} tree/ && "
        "mkdir -p t2 && tar cf - -C tree . | tar xf - -C t2 && "
        "ln t2/$(ls t2 | head -1) hard 2>/dev/null || true; "
        "ln -s tree/../t2 sym && ln -s dangling dsym && "
        "printf 'hello\\n' > f && chmod 640 f && chown 65534:65534 f && "
        "setfattr -n user.colour -v blue f && touch -d '2001-02-03 04:05:06.789' f && "
        "mkfifo fifo && mkdir -p a/b/c && echo deep > a/b/c/d && mv a/b/c a/c && "
        "dd if=/dev/urandom of=big bs=64K count=37 status=none && "
        "dd if=/dev/urandom of=big conv=notrunc bs=1000 seek=77 count=3 status=none && "
        "truncate -s 10M sparse && echo tail >> sparse && "
        "sed -i s/hello/bye/ f && rm -rf t2/$(ls t2 | tail -1)",
        here,
    )
    want = assert_same_everywhere(mnts, origin)
    assert want["f"][-1] == b"bye\n" and want["f"][1] == 65534
    # Removing it from a third node empties it everywhere.
    third = "n3"
    shutil.rmtree(mnts[third] / "tree")
    for node in NODES:
        assert not (mnts[node] / "tree").exists()


def test_git_on_one_node_fsck_on_another(mnts: dict[str, Path]) -> None:
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    run(
        "git init -q repo && cd repo && for i in $(seq 40); do echo $i > f$i; done && "
        "git add . && git -c user.name=t -c user.email=t@t commit -qm one && "
        "echo changed >> f7 && git -c user.name=t -c user.email=t@t commit -qam two && git gc -q",
        mnts["n3"],
    )
    out = run(
        "git fsck --strict && git log --oneline | wc -l && git status --porcelain",
        mnts["n1"] / "repo",
    )
    assert out.split() == ["2"]
    assert_same_everywhere(mnts, "n3")


def test_sqlite_written_on_one_node_read_on_others(mnts: dict[str, Path]) -> None:
    if shutil.which("sqlite3") is None:
        pytest.skip("sqlite3 not installed")
    run(
        "sqlite3 db 'create table t(x); "
        + " ".join(f"insert into t values({i});" for i in range(200))
        + "'",
        mnts["n2"],
    )
    for node in ("n1", "n3"):
        assert run("sqlite3 db 'select count(*), sum(x) from t'", mnts[node]).split() == [
            "200|19900"
        ]


def test_changes_show_at_once_in_cached_views(mnts: dict[str, Path]) -> None:
    """The other kernels cached the old state (attributes, data, names, absence)."""
    a, b = mnts["n2"], mnts["n3"]
    (a / "f").write_text("one\n")
    assert (b / "f").read_text() == "one\n"
    assert not (b / "new").exists()  # a negative entry in n3's kernel
    listing = sorted(os.listdir(b))
    for _ in range(20):
        (a / "f").write_text("two, longer\n")
        assert (b / "f").read_text() == "two, longer\n"
        assert os.stat(b / "f").st_size == 12
        (a / "f").write_text("one\n")
        assert (b / "f").read_text() == "one\n"
    (a / "new").write_text("x")
    assert (b / "new").read_text() == "x"
    assert sorted(os.listdir(b)) == sorted([*listing, "new"])
    os.chmod(a / "f", 0o600)
    assert os.stat(b / "f").st_mode & 0o777 == 0o600
    os.rename(a / "new", a / "renamed")
    assert not (b / "new").exists() and (b / "renamed").read_text() == "x"
    os.unlink(mnts["n1"] / "renamed")
    assert not (a / "renamed").exists() and not (b / "renamed").exists()
    # Appends on one node, reads of the growing file on another: each append is there once
    # fsync returned (file data is acknowledged at fsync/close, docs/CONSISTENCY.md §4) ...
    with open(a / "log", "ab") as w:
        for i in range(50):
            w.write(b"%d\n" % i)
            w.flush()
            os.fsync(w.fileno())
            assert (b / "log").read_bytes().endswith(b"%d\n" % i)
        # ... and shows soon without it (streamed as it is written).
        w.write(b"tail\n")
        w.flush()
        wait_until(
            "an append without fsync to show on another node",
            lambda: (b / "log").read_bytes()[-20:],
            ok=lambda tail: tail.endswith(b"tail\n"),
        )


def test_a_change_racing_a_lookup_on_another_node_still_shows(mnts: dict[str, Path]) -> None:
    """n1 looks a name up while n2 creates and writes the file: n1's kernel makes the inode
    from a lookup answer given just before the write, after the write's invalidation came.
    That invalidation must not be lost (it once was, about 1 time in 200: the file then
    showed 0 bytes on n1 for the 300 s attribute timeout)."""
    a, b = mnts["n2"] / "race", mnts["n1"] / "race"
    a.mkdir()
    target: dict[str, Any] = {"name": "", "stop": False, "misses": 0}

    def poll() -> None:
        while not target["stop"]:
            name = target["name"]
            try:
                with open(b / name, "rb") as f:
                    f.read()
            except FileNotFoundError:
                if name == target["name"]:
                    target["misses"] += 1  # n1's kernel looked this name up, negatively
            except OSError:
                pass

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for i in range(500):
            name = f"f{i}"
            target["misses"] = 0
            target["name"] = name
            # The poller has looked it up (negative) before the write: the race is on.
            wait_until(f"a lookup of {name} on n1", lambda: target["misses"], ok=bool)
            (a / name).write_bytes(b"x" * 100)
            # Well within the 300 s attribute timeout that a lost invalidation would show.
            wait_until(
                f"n1 to show n2's write of {name}",
                (b / name).read_bytes,
                ok=(b"x" * 100).__eq__,
                retry_on=(FileNotFoundError,),
            )
    finally:
        target["stop"] = True
        poller.join()


@pytest.mark.parametrize("node", ["n1", "n2"])
def test_writes_through_two_descriptors_keep_their_order(mnts: dict[str, Path], node: str) -> None:
    """Small writes are held per handle and written later as one (CONSISTENCY.md §4): the
    writes of two descriptors of one file must still land in the order they were made."""
    f = mnts[node] / "two"
    f.write_bytes(b"")
    one, two = os.open(f, os.O_WRONLY), os.open(f, os.O_WRONLY)
    try:
        os.pwrite(one, b"a" * 100, 0)
        os.pwrite(two, b"b" * 100, 100)
        os.pwrite(one, b"c" * 100, 100)  # after two's: it wins
        os.pwrite(two, b"d" * 50, 200)
    finally:
        os.close(one)
        os.close(two)
    want = b"a" * 100 + b"c" * 100 + b"d" * 50
    for m in mnts.values():
        assert (m / "two").read_bytes() == want


@pytest.mark.parametrize("node", ["n1", "n2"])
def test_truncate_times_as_linux(mnts: dict[str, Path], node: str) -> None:
    """ftruncate(2) sets mtime and ctime even at the same size, truncate(2) by path only when
    the size changes (as ext4). Without the writeback cache (cluster nodes) the kernel
    leaves both to dfs; a shrinking truncate of a file past 64 KiB once kept the old times."""
    f = mnts[node] / "t"
    f.write_bytes(b"x" * 70000)
    before = os.stat(f)
    next_file_time()
    os.truncate(f, 70000)  # same size, by path: nothing changes
    same = os.stat(f)
    assert (same.st_mtime_ns, same.st_ctime_ns) == (before.st_mtime_ns, before.st_ctime_ns)
    os.truncate(f, 10)  # shrinks: both change
    cut = os.stat(f)
    assert cut.st_mtime_ns > before.st_mtime_ns and cut.st_ctime_ns > before.st_ctime_ns
    next_file_time()
    fd = os.open(f, os.O_WRONLY)
    try:
        os.ftruncate(fd, 10)  # same size, through a descriptor: both change
        after = os.fstat(fd)
    finally:
        os.close(fd)
    assert after.st_mtime_ns > cut.st_mtime_ns and after.st_ctime_ns > cut.st_ctime_ns
    for other in mnts.values():  # and every node shows the same
        st = os.stat(other / "t")
        assert (st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (
            10,
            after.st_mtime_ns,
            after.st_ctime_ns,
        )


def test_concurrent_creates_of_one_name_one_wins(mnts: dict[str, Path]) -> None:
    results: dict[str, list[int]] = {n: [] for n in NODES}
    names = [f"x{i}" for i in range(60)]
    start = threading.Barrier(len(NODES))

    def creator(node: str) -> None:
        start.wait()
        for name in names:
            try:
                fd = os.open(mnts[node] / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except OSError as exc:
                results[node].append(exc.errno)
                continue
            os.write(fd, node.encode())
            os.close(fd)
            results[node].append(0)

    threads = [threading.Thread(target=creator, args=(n,)) for n in NODES]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, name in enumerate(names):
        outcomes = sorted(results[n][i] for n in NODES)
        assert outcomes == [0, errno.EEXIST, errno.EEXIST], (name, outcomes)
        winner = [n for n in NODES if results[n][i] == 0][0]
        for node in NODES:
            got = (mnts[node] / name).read_text()
            assert got == winner, (name, node, got, os.stat(mnts[node] / name))
    # mkdir races too.
    errs: list[int] = []
    lock = threading.Lock()

    def mkdirs(node: str) -> None:
        for i in range(30):
            try:
                os.mkdir(mnts[node] / f"d{i}")
                e = 0
            except OSError as exc:
                e = exc.errno or -1
            with lock:
                errs.append(e)

    threads = [threading.Thread(target=mkdirs, args=(n,)) for n in NODES]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errs.count(0) == 30 and errs.count(errno.EEXIST) == 60
    assert_same_everywhere(mnts, "n1")


def test_rename_is_atomic_as_seen_from_other_nodes(mnts: dict[str, Path]) -> None:
    writer = mnts["n2"]
    (writer / "current").write_text("v0")
    stop = threading.Event()
    bad: list[str] = []

    def reader(node: str) -> None:
        while not stop.is_set():
            try:
                text = (mnts[node] / "current").read_text()
            except OSError as exc:
                bad.append(f"{node}: {exc}")
                return
            if not text.startswith("v"):
                bad.append(f"{node}: read {text!r}")
                return

    readers = [threading.Thread(target=reader, args=(n,)) for n in ("n1", "n3")]
    for t in readers:
        t.start()
    try:
        for i in range(1, 150):
            (writer / "tmp").write_text(f"v{i}")
            os.rename(writer / "tmp", writer / "current")
    finally:
        stop.set()
        for t in readers:
            t.join(30)
    assert not bad, bad
    for node in NODES:
        assert (mnts[node] / "current").read_text() == "v149"


def test_writes_are_durable_on_every_site(mnts: dict[str, Path]) -> None:
    data = os.urandom(3 * 1024 * 1024 + 12345)
    with open(mnts["n3"] / "big", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    for node in NODES:
        assert (mnts[node] / "big").read_bytes() == data
    with open(mnts["n1"] / "big", "r+b") as f:
        f.seek(100_000)
        f.write(b"Z" * 10)
        f.truncate(2_000_000)
    expect = data[:100_000] + b"Z" * 10 + data[100_010:2_000_000]
    for node in NODES:
        assert (mnts[node] / "big").read_bytes() == expect


def _status(cluster: Launcher) -> dict[str, dict[str, Any]]:
    return cluster.nodes()


def test_storage_site_killed_mid_workload_catches_up(
    cluster: Launcher, mnts: dict[str, Path]
) -> None:
    """SIGKILL n3 while n2 writes; updates go on; n3 restarts and catches up; nothing lost."""
    acked = writes_while_a_site_is_killed(cluster, mnts["n2"], "n3", rename_every=5)
    assert len(acked) > 10
    want = assert_same_everywhere(mnts, "n2")
    assert set(acked) <= set(want)


def test_updates_fail_fast_without_the_primary(cluster: Launcher, mnts: dict[str, Path]) -> None:
    (mnts["n1"] / "kept").write_text("still here")
    r = cluster.dfs("stop", "n1", "--kill")
    assert r.returncode == 0, r.stderr
    try:
        for node in ("n2", "n3"):  # refused at once (EROFS), not after a timeout
            with pytest.raises(OSError) as exc:
                os.mkdir(mnts[node] / "new")
            assert exc.value.errno == errno.EROFS
            with pytest.raises(OSError):
                (mnts[node] / "kept").write_text("changed")
            assert (mnts[node] / "kept").read_text() == "still here"
    finally:
        r = cluster.dfs("start", "n1")
        assert r.returncode == 0, r.stdout + r.stderr

    # Updates work again once n2 has reconnected to n1 (a heartbeat or so).
    def mkdir_after() -> None:
        with contextlib.suppress(FileExistsError):  # an attempt that timed out did happen
            os.mkdir(mnts["n2"] / "after")

    wait_until("an update on n2 to work again", mkdir_after, ok=lambda _: True, retry_on=(OSError,))
    assert (mnts["n3"] / "after").is_dir()
    assert (mnts["n2"] / "kept").read_text() == "still here"


def test_host_views_show_each_nodes_copy(cluster: Launcher, mnts: dict[str, Path]) -> None:
    top = cluster.root / "n1" / "mnt"
    name = mnts["n1"].name
    (mnts["n2"] / "hv").write_text("one")
    os.mkdir(mnts["n2"] / "sub")
    os.symlink("hv", mnts["n2"] / "link")
    os.setxattr(mnts["n2"] / "hv", "user.k", b"v")
    assert "..." not in os.listdir(top)
    assert sorted(os.listdir(top / "...")) == list(NODES)
    for host in NODES:
        view = top / "..." / host / name
        assert sorted(os.listdir(view)) == ["hv", "link", "sub"]
        assert (view / "hv").read_text() == "one"
        assert os.readlink(view / "link") == "hv"
        assert os.getxattr(view / "hv", "user.k") == b"v"
        assert (view / "sub").is_dir()
        assert os.stat(view / "hv").st_size == 3
        with pytest.raises(FileNotFoundError):
            os.stat(view / "absent")
    # A write through a view is a write to the same file in the tree.
    (top / "..." / "n3" / name / "hv").write_text("two")
    for node in NODES:
        assert (mnts[node] / "hv").read_text() == "two"
    # A node that is down: listed, but reading under it fails fast.
    r = cluster.dfs("stop", "n3", "--kill")
    assert r.returncode == 0, r.stderr
    try:
        assert "n3" in os.listdir(top / "...")
        with pytest.raises(OSError) as exc:
            os.listdir(top / "..." / "n3" / name)
        assert exc.value.errno in (errno.EHOSTDOWN, errno.ETIMEDOUT, errno.ENOENT)
        assert (top / "..." / "n2" / name / "hv").read_text() == "two"
    finally:
        r = cluster.dfs("start", "n3")
        assert r.returncode == 0, r.stdout + r.stderr


# --- locks (CONSISTENCY.md §4, "Locks") ---------------------------------------------------

# Run in a process of its own: tries a lock without waiting and prints "ok" or the errno's name.
TRY_LOCK = """
import errno, fcntl, os, sys
path, kind = sys.argv[1], sys.argv[2]
try:
    if kind == "flock":
        fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    elif kind == "fcntl":
        fd = os.open(path, os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    elif kind == "excl":
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    else:
        os.mkdir(path)
    print("ok")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def try_lock(path: Path, kind: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", TRY_LOCK, str(path), kind],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def outcome(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out.strip()


@pytest.mark.parametrize("kind", ["flock", "fcntl"])
def test_locks_hold_only_on_the_node_that_took_them(mnts: dict[str, Path], kind: str) -> None:
    """pyfuse3 has no lock operations: each node's kernel keeps flock/fcntl locks of its own
    mount. A lock taken through n1 excludes other processes on n1, but not a process on n2."""
    f = mnts["n1"] / "locked"
    f.write_text("x")
    fd = os.open(f, os.O_RDWR)
    try:
        if kind == "flock":
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert outcome(try_lock(f, kind)) in ("EWOULDBLOCK", "EAGAIN", "EACCES")
        assert outcome(try_lock(mnts["n2"] / "locked", kind)) == "ok"  # not excluded there
    finally:
        os.close(fd)
    assert outcome(try_lock(f, kind)) == "ok"  # and on n1 once released


@pytest.mark.parametrize("kind", ["excl", "mkdir"])
def test_lock_files_exclude_across_nodes(mnts: dict[str, Path], kind: str) -> None:
    """What to use instead: creating a lock file with O_CREAT|O_EXCL, or a lock directory with
    mkdir, is decided by the primary, so of processes on n1 and n2 racing for one name exactly
    one gets it; once it is removed, the next one can."""
    for i in range(20):
        lock = f"lock{i}"
        procs = {n: try_lock(mnts[n] / lock, kind) for n in ("n1", "n2")}
        got = {n: outcome(p) for n, p in procs.items()}
        assert sorted(got.values()) == ["EEXIST", "ok"], (lock, got)
        loser = "n1" if got["n2"] == "ok" else "n2"
        assert outcome(try_lock(mnts[loser] / lock, kind)) == "EEXIST"  # still held
        (os.rmdir if kind == "mkdir" else os.unlink)(mnts["n3"] / lock)  # released anywhere
        assert outcome(try_lock(mnts[loser] / lock, kind)) == "ok"


def test_truncate_by_path_right_after_a_write_on_a_site(mnts: dict[str, Path]) -> None:
    """write + close, then truncate(2) by path, on n2: must always work (it does on n1)."""
    rng = random.Random(9)
    failures = []
    for i in range(300):
        p = mnts["n2"] / f"t{i % 5}"
        with open(p, "wb") as f:
            f.write(rng.randbytes(rng.choice([5000, 65536, 103913])))
        try:
            os.truncate(p, rng.randrange(140_000))
        except OSError as exc:
            failures.append((i, exc.errno))
    assert not failures, failures
