"""Read repair on a cluster node: a block of this node's replica that fails its checksum is
fetched from another replica whose copy verifies, the read returns the right bytes, and the
bad block is rewritten here (logged and counted). With no good copy anywhere: EIO."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from dfs.cluster.control import request, socket_path
from dfs.data.store import DataStore
from dfs.hashing import BLOCK_SIZE
from tests.fuse.clusters import Launcher, module_cluster

pytestmark = [pytest.mark.fuse, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    yield from module_cluster(tmp_path_factory, "rr")


def _data_file(cluster: Launcher, node: str, ino: int) -> str:
    return DataStore(cluster.root / node / "data" / "data").fspath(ino)


def _flip(path: str, off: int) -> bytes:
    """Flip one byte of a data file behind the daemon's back; returns the original byte."""
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, 1, off)
        os.pwrite(fd, bytes([old[0] ^ 0x5A]), off)
        return old
    finally:
        os.close(fd)


def _byte(path: str, off: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(1)


def _repairs(cluster: Launcher, node: str) -> tuple[int, int]:
    """(checksum failures, read repairs) from the node's status (its control socket)."""
    status = request(socket_path(cluster.root / node / "data"), "status", {})
    rep = status["replication"]
    return rep["checksum_failures"], rep["read_repairs"]


def test_a_flipped_byte_is_read_right_and_repaired(cluster: Launcher) -> None:
    data = os.urandom(5 * BLOCK_SIZE + 1234)
    (cluster.root / "n1" / "mnt" / "f").write_bytes(data)  # written on the primary
    on_n2 = cluster.root / "n2" / "mnt" / "f"
    ino = on_n2.stat().st_ino  # attributes only: n2's kernel caches none of the contents
    path = _data_file(cluster, "n2", ino)
    off = 3 * BLOCK_SIZE + 77
    good = _flip(path, off)
    failures, repairs = _repairs(cluster, "n2")

    assert on_n2.read_bytes() == data  # through n2's mount: the right bytes
    assert _byte(path, off) == good  # and n2's copy is repaired
    assert _repairs(cluster, "n2") == (failures + 1, repairs + 1)
    log = (cluster.root / "n2" / "mountd.log").read_text()
    assert f"read repair: inode {ino:#x} block 3" in log


def test_no_good_copy_anywhere_is_eio(cluster: Launcher) -> None:
    data = os.urandom(2 * BLOCK_SIZE)
    (cluster.root / "n1" / "mnt" / "g").write_bytes(data)
    ino = (cluster.root / "n2" / "mnt" / "g").stat().st_ino
    off = BLOCK_SIZE + 5
    for node in ("n1", "n2", "n3"):
        _flip(_data_file(cluster, node, ino), off)
    with pytest.raises(OSError) as e:
        (cluster.root / "n2" / "mnt" / "g").read_bytes()
    assert e.value.errno == errno.EIO
    log = (cluster.root / "n2" / "mountd.log").read_text()
    assert "no other replica has a good copy" in log
