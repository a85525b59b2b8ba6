"""The one mountinfo reader (dfs/mounts.py): octal escapes and file names that are not ASCII.

The fake mountinfo is bytes as the kernel writes them: space, tab, newline and
backslash octal-escaped, every other byte (UTF-8 of é, an invalid 0xff) raw.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dfs import mounts as M

# Mount points (as the bytes of the path) and how mountinfo writes them.
ODD = {
    b"/srv/with space/mnt": rb"/srv/with\040space/mnt",
    b"/srv/tab\there": rb"/srv/tab\011here",
    b"/srv/new\nline": rb"/srv/new\012line",
    b"/srv/back\\slash": rb"/srv/back\134slash",
    "/srv/caf\u00e9/mnt".encode(): "/srv/caf\u00e9/mnt".encode(),
    b"/srv/bad\xffbyte": b"/srv/bad\xffbyte",
    b"/srv/all \t\\\xc3\xa9\xfe": rb"/srv/all\040\011\134" + b"\xc3\xa9\xfe",
}


def line(n: int, escaped: bytes, *, source: bytes = b"dfs:/d", optional: bytes = b"") -> bytes:
    return b"%d 1 0:%d / %s rw,relatime %s- fuse.dfs %s rw,user_id=0" % (
        n,
        n,
        escaped,
        optional,
        source,
    )


def test_escapes_and_non_ascii_names_come_back_as_the_paths_bytes() -> None:
    text = b"\n".join(line(40 + i, esc) for i, esc in enumerate(ODD.values())) + b"\n"
    got = M.read_mounts(text)
    assert [os.fsencode(e.mount_point) for e in got] == list(ODD)
    assert got[4].mount_point == "/srv/caf\u00e9/mnt"  # UTF-8 decoded, not byte by byte
    assert got[5].mount_point == "/srv/bad\udcffbyte"  # undecodable: a surrogate, round-trips
    assert got[0] == M.MountEntry(
        "/srv/with space/mnt", "/", os.makedev(0, 40), "fuse.dfs", "dfs:/d"
    )


def test_the_source_field_is_unescaped_too() -> None:
    text = line(7, b"/m", source="dfs:/srv/d\\040\u00e9".encode())
    (entry,) = M.read_mounts(text)
    assert entry.source == "dfs:/srv/d \u00e9"


def test_str_input_is_taken_as_fsdecoded_bytes() -> None:
    raw = line(7, b"/srv/bad\xff\\040x")
    assert M.read_mounts(os.fsdecode(raw)) == M.read_mounts(raw)
    assert M.read_mounts(raw)[0].mount_point == "/srv/bad\udcff x"


def test_optional_fields_and_lines_that_are_not_mountinfo() -> None:
    text = b"\n".join(
        [
            line(1, b"/a", optional=b"shared:1 master:2 "),
            b"garbage",
            b"",
            b"1 2 x:y / /b rw - ext4 /dev/x rw",  # no device number
            line(2, b"/c"),
        ]
    )
    assert [e.mount_point for e in M.read_mounts(text)] == ["/a", "/c"]


def test_mount_at_takes_the_top_of_stacked_mounts() -> None:
    table = M.read_mounts(line(1, b"/m", source=b"first") + b"\n" + line(2, b"/m", source=b"top"))
    found = M.mount_at("/m", table)
    assert found is not None and found.source == "top"
    assert M.mount_at(Path("/m"), table) == found
    assert M.mount_at("/m/", table) is None  # mount points are compared as written


def test_this_process_table_has_the_root_and_proc() -> None:
    assert "/" in M.mount_points()
    assert M.is_mounted("/proc")
    assert not M.is_mounted("/proc/self")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")
def test_a_real_mount_with_an_odd_name_is_found_and_force_unmounted(tmp_path: Path) -> None:
    where = os.fsencode(tmp_path) + b"/a b\t\\\xc3\xa9\xff"
    os.mkdir(where)
    name = os.fsdecode(where)
    r = subprocess.run(["mount", "-t", "tmpfs", "none", where], capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace')}")
    try:
        assert M.is_mounted(name)
        entry = M.mount_at(name)
        assert entry is not None and entry.fstype == "tmpfs"
        assert entry.dev == os.stat(where).st_dev
    finally:
        M.force_unmount(name)
    assert not M.is_mounted(name)
    with pytest.raises(M.UnmountError, match="cannot unmount"):
        M.force_unmount(name)
