"""``python -m mountd`` as an operator meets it: bad mount points, bad data directories,
stale mounts, signals and the command line.

Every refusal must exit with its documented code (2 usage, 3 mount point, 4
data directory), say why in one line on stderr, and leave nothing mounted.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from pathlib import Path

import lmdb
import pytest

from dfs.meta import schema as S
from dfs.meta.store import MetaStore
from dfs.mounts import mount_points
from mountd.daemon import EXIT_DATADIR, EXIT_MOUNTPOINT, EXIT_OK, EXIT_USAGE
from tests.mounting import Mount, mountd

pytestmark = pytest.mark.fuse


def assert_refused(r: subprocess.CompletedProcess[str], code: int, *phrases: str) -> str:
    """Exit ``code`` and exactly one stderr line that contains every phrase."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == code, f"exit {r.returncode}, expected {code}:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, f"expected one line on stderr:\n{r.stderr}"
    for phrase in phrases:
        assert phrase in lines[0], f"{phrase!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def fresh(tmp_path: Path) -> tuple[Path, Path]:
    """A data directory that does not exist yet and an empty mount point."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    (tmp_path / "mnt").mkdir()
    return tmp_path / "data", tmp_path / "mnt"


# --- mount point problems: exit 3, the data directory untouched ----------------------------


def test_missing_mount_point(fresh: tuple[Path, Path]) -> None:
    data, mnt = fresh
    r = mountd("--data", data, mnt / "nope", scope=mnt.parent)
    assert_refused(r, EXIT_MOUNTPOINT, str(mnt / "nope"), "does not exist")
    assert not data.exists()


def test_mount_point_is_a_file(fresh: tuple[Path, Path]) -> None:
    data, mnt = fresh
    (mnt / "file").write_text("x")
    r = mountd("--data", data, mnt / "file", scope=mnt.parent)
    assert_refused(r, EXIT_MOUNTPOINT, "not a directory")
    assert (mnt / "file").read_text() == "x"


def test_mount_point_not_empty(fresh: tuple[Path, Path]) -> None:
    data, mnt = fresh
    (mnt / "precious").write_text("keep me")
    r = mountd("--data", data, mnt, scope=mnt.parent)
    assert_refused(r, EXIT_MOUNTPOINT, str(mnt), "not empty")
    assert (mnt / "precious").read_text() == "keep me"


def test_mount_point_already_mounted(node: Mount, tmp_path: Path) -> None:
    (node.path / "f").write_text("first daemon")
    r = mountd("--data", tmp_path / "other", node.path, scope=tmp_path)
    assert_refused(r, EXIT_MOUNTPOINT, "already mounted")
    assert (node.path / "f").read_text() == "first daemon"
    (node.path / "g").write_text("still served")
    assert (node.path / "g").read_text() == "still served"
    assert node.proc is not None and node.proc.poll() is None


# --- data directory problems: exit 4 --------------------------------------------------------


def test_data_dir_locked_by_running_daemon(node: Mount, tmp_path: Path) -> None:
    (tmp_path / "mnt2").mkdir()
    r = mountd("--data", node.data_dir, tmp_path / "mnt2", scope=tmp_path)
    assert node.proc is not None
    assert_refused(r, EXIT_DATADIR, str(node.data_dir), f"pid {node.proc.pid}")
    assert (node.path / "x").write_text("ok") == 2  # the running daemon is unharmed


def test_data_dir_is_a_file(fresh: tuple[Path, Path]) -> None:
    data, mnt = fresh
    data.write_text("not a directory")
    r = mountd("--data", data, mnt, scope=mnt.parent)
    assert_refused(r, EXIT_DATADIR, str(data), "not a directory")
    assert data.read_text() == "not a directory"


def test_data_dir_with_foreign_files(fresh: tuple[Path, Path]) -> None:
    data, mnt = fresh
    data.mkdir()
    (data / "notes.txt").write_text("mine")
    r = mountd("--data", data, mnt, scope=mnt.parent)
    assert_refused(r, EXIT_DATADIR, str(data), "not a dfs data directory")
    assert os.listdir(data) == ["notes.txt"]


def test_data_dir_of_another_format_version(fresh: tuple[Path, Path]) -> None:
    data, mnt = fresh
    MetaStore.open(data / "meta").close()
    env = lmdb.open(str(data / "meta"), max_dbs=len(S.DB_NAMES) + 2)
    try:
        with env.begin(write=True) as txn:
            txn.put(S.META_FORMAT, S.u32(S.FORMAT_VERSION + 1), db=env.open_db(b"meta", txn=txn))
    finally:
        env.close()
    r = mountd("--data", data, mnt, scope=mnt.parent)
    assert_refused(r, EXIT_DATADIR, "format version", str(S.FORMAT_VERSION + 1))
    with pytest.raises(Exception, match="format version"):  # the store was left as it was
        MetaStore.open(data / "meta").close()


# --- life cycle -----------------------------------------------------------------------------


def test_stale_mount_recovered_at_start(node: Mount) -> None:
    (node.path / "f").write_bytes(b"before the crash")
    node.kill()
    assert node.is_mounted()
    with pytest.raises(OSError) as exc:
        os.listdir(node.path)
    assert exc.value.errno == errno.ENOTCONN
    node.start()
    log = node.log().rsplit("==== start #", 1)[-1]
    assert "cleaned up a stale mount left by a daemon that died" in log
    assert "previous daemon did not stop cleanly" in log
    assert (node.path / "f").read_bytes() == b"before the crash"
    assert len([p for p in mount_points() if p == str(node.path)]) == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_unmounts_cleanly(node: Mount, sig: signal.Signals) -> None:
    (node.path / "f").write_bytes(b"kept")
    assert node.proc is not None
    node.proc.send_signal(sig)
    assert node.proc.wait(30) == EXIT_OK
    assert not node.is_mounted()
    log = node.log()
    assert f"received {sig.name}: unmounting" in log
    assert "unmounted" in log.rsplit("received", 1)[-1]
    node.start()  # the store was closed cleanly: no recovery needed
    assert "did not stop cleanly" not in node.log().rsplit("==== start #", 1)[-1]
    assert (node.path / "f").read_bytes() == b"kept"


# --- command line ---------------------------------------------------------------------------


def test_help(tmp_path: Path) -> None:
    r = mountd("--help", scope=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout and "--data" in r.stdout and "MOUNTPOINT" in r.stdout
    assert "Exit codes" in r.stdout


def test_unknown_option(fresh: tuple[Path, Path]) -> None:
    data, mnt = fresh
    r = mountd("--data", data, "--bogus", mnt, scope=mnt.parent)
    assert r.returncode == EXIT_USAGE, r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "No such option" in error[0] and "--bogus" in error[0], r.stderr
    assert not data.exists()


def test_missing_data_option(fresh: tuple[Path, Path]) -> None:
    _, mnt = fresh
    r = mountd(mnt, scope=mnt.parent)
    assert r.returncode == EXIT_USAGE, r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "--data" in error[0], r.stderr
