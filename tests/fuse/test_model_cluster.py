"""The model-based test (tests/fuse/test_model.py) on a node of a 3-node cluster.

The same hypothesis state machine applies random syscalls to n2's mount and to
a local directory and compares every result, errno and the trees. n2 is a
storage site, not the primary: each update is forwarded to n1, writes are held
and posted, reads of files with writes in flight go to the primary, and n2
waits for its own replica. At the end the trees of n1, n2 and n3 must equal
each other (entries, link groups, inode numbers and times) and the local one.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from tests.fuse.clusters import Launcher, launched
from tests.fuse.test_model import MODEL_SETTINGS, ModelMachine, diff, snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

# Each step costs a replicated round trip or more: fewer examples than on one node in CI
# (about 45 s); DFS_MODEL_EXAMPLES=N (see test_model.py) runs N with a fresh seed.
CLUSTER_SETTINGS = (
    MODEL_SETTINGS
    if os.environ.get("DFS_MODEL_EXAMPLES")
    else settings(MODEL_SETTINGS, max_examples=150)
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Launcher]:
    with launched(tmp_path / "c", show_logs=lambda: False) as launcher:
        r = launcher.up()
        assert r.returncode == 0, r.stdout + r.stderr + launcher.logs()
        yield launcher


def test_model_on_a_site(cluster: Launcher, tmp_path: Path) -> None:
    mnt = {n: cluster.root / n / "mnt" / "model" for n in ("n1", "n2", "n3")}
    mnt["n2"].mkdir()
    local = tmp_path / "local"
    local.mkdir()
    counter = itertools.count()
    histories: dict[str, list[str]] = {}

    class Machine(ModelMachine):
        def __init__(self) -> None:
            super().__init__(mnt["n2"], local, next(counter), histories)

    run_state_machine_as_test(Machine, settings=CLUSTER_SETTINGS)
    on_n2, reference = snapshot(str(mnt["n2"])), snapshot(str(local))
    assert on_n2.entries == reference.entries, diff(on_n2.entries, reference.entries)
    assert on_n2.links == reference.links
    for other in ("n1", "n3"):
        there = snapshot(str(mnt[other]))
        assert there.entries == on_n2.entries, diff(there.entries, on_n2.entries, (other, "n2"))
        assert there.links == on_n2.links
        assert there.times == on_n2.times, diff(there.times, on_n2.times, (other, "n2"))
    assert not cluster.bugs(), cluster.logs()
