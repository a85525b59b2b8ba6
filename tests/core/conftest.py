"""Fixture ``core``: a fresh node core in tmp_path; every test using it ends with the checker.

At teardown the checker must find nothing twice: first on the live state
(open files and unlinked-but-referenced inodes included; only "dirty-unsettled"
is expected while files are open), then after the kernel's references are
dropped as at unmount.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.core.harness import Core


@pytest.fixture
def core(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Core]:
    c = Core(tmp_path / "node")
    try:
        yield c
        if getattr(request.node, "rep_call_failed", False):
            return
        live = [f for f in c.findings() if f.code != "dirty-unsettled"]
        assert not live, "checker findings on the live store:\n" + "\n".join(map(str, live))
        c.settle()
        final = c.findings()
        assert not final, "checker findings after settling:\n" + "\n".join(map(str, final))
    finally:
        c.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.when == "call" and rep.failed:
        item.rep_call_failed = True  # type: ignore[attr-defined]
