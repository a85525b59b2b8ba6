"""``dfs volume``: finding the daemon of a mount from the mount table, and usage errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from click.testing import CliRunner
from dfs_tools.cli import main
from dfs_tools.volume import data_dir_of

from dfs.cluster.volumes import Volume, decode_mount, encode_mount
from dfs.types import InodeId, VolumeId


def _line(mnt: str, source: str) -> str:
    return f"42 27 0:39 / {mnt} rw,nosuid,nodev,relatime - fuse.dfs {source} rw,user_id=0\n"


def test_the_mount_source_names_the_data_directory() -> None:
    info = _line("/run/c/n1/mnt", "dfs:/run/c/n1/data") + _line("/x/y", "dfs")
    assert data_dir_of(Path("/run/c/n1/mnt"), info) == Path("/run/c/n1/data")
    assert data_dir_of(Path("/x/y"), info) is None  # a plain "dfs": give --data
    assert data_dir_of(Path("/elsewhere"), info) is None
    # Mount points with spaces are octal-escaped in mountinfo.
    spaced = _line("/tmp/with\\040space/mnt", "dfs:/srv/d")
    assert data_dir_of(Path("/tmp/with space/mnt"), spaced) == Path("/srv/d")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["volume", "create", str(tmp_path), "--primary", "n1"])
    assert r.exit_code == 2 and "not inside a dfs mount" in r.output
    r = runner.invoke(main, ["volume", "create", "/x"])
    assert r.exit_code == 2 and "--primary" in r.output
    r = runner.invoke(main, ["volume", "list", "--data", str(tmp_path)])
    assert r.exit_code == 2 and "no daemon runs on" in r.output
    r = runner.invoke(main, ["volume", "create", "/x", "--primary", "n1", "--failover-after", "0"])
    assert r.exit_code == 2 and "--failover-after" in r.output
    r = runner.invoke(main, ["volume", "promote", "/x"])
    assert r.exit_code == 2 and "NODE" in r.output


def test_a_volume_record_keeps_its_failover_after() -> None:
    v = Volume(VolumeId(3), "/p", InodeId(9), "n1", ("n1", "n2", "n3"), InodeId(5), InodeId(1))
    assert decode_mount(5, encode_mount(v)) == v
    slow = replace(v, failover_after=8.0)
    assert decode_mount(5, encode_mount(slow)) == slow
    assert slow.as_dict()["failover_after"] == 8.0 and "failover_after" not in v.as_dict()
    # A record from a node that does not know the field reads as the cluster's default.
    assert len(encode_mount(v)) < len(encode_mount(slow))
