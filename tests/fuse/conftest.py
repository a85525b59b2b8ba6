"""Fixtures for tests through a real FUSE mount: one fresh mount per test, always unmounted."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import Mount


def _fuse_available() -> str | None:
    if os.geteuid() != 0:
        return "mounted tests run as root (they check permissions as other users)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


@pytest.fixture
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mount]:
    """A fresh single-node dfs mount; ``node.path`` is the mount point."""
    reason = _fuse_available()
    if reason:
        pytest.skip(reason)
    # The tmp dir must be traversable by the unprivileged users some tests run as.
    os.chmod(tmp_path, 0o755)
    m = Mount(tmp_path / "data", tmp_path / "mnt", tmp_path / "mountd.log")
    m.start()
    failed = True
    try:
        yield m
        failed = False
    finally:
        m.stop()
        if failed or getattr(request.node, "rep_call_failed", False):
            print(f"---- dfs-mountd log ----\n{m.log()}")
        bugs = m.bugs()
        assert not bugs, "daemon logged unexpected exceptions:\n" + "\n".join(bugs) + m.log()


@pytest.fixture
def mnt(node: Mount) -> Path:
    """The mount point of a fresh single-node mount."""
    return node.path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.when == "call" and rep.failed:
        item.rep_call_failed = True  # type: ignore[attr-defined]
