"""The model-based test (tests/fuse/test_model.py) on nodes of a 4-node cluster.

The same hypothesis state machine applies random syscalls to one node's mount
and to a local directory and compares every result, errno and the trees. n2 is
a storage site, not the primary: each update is forwarded to n1, writes are
held and posted, reads of files with writes in flight go to the primary, and
n2 waits for its own replica. n4 stores no replica (the root volume has three):
it reads everything from n1, with short kernel timeouts. At the end the trees
of every node must equal each other (entries, link groups, inode numbers and
times) and the local one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.fuse.clusters import Launcher, launched
from tests.fuse.test_model import MODEL_SETTINGS, diff, run_model, snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

# Each step costs a replicated round trip or more: fewer examples than on one node in CI
# (about 30 s per node); DFS_MODEL_EXAMPLES=N (see test_model.py) runs N with a fresh seed.
CLUSTER_SETTINGS = (
    MODEL_SETTINGS
    if os.environ.get("DFS_MODEL_EXAMPLES")
    else settings(MODEL_SETTINGS, max_examples=100)
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Launcher]:
    with launched(tmp_path / "c", nodes=4, show_logs=lambda: False) as launcher:
        r = launcher.up(nodes=4)
        assert r.returncode == 0, r.stdout + r.stderr + launcher.logs()
        yield launcher


# n1 (the primary) too with DFS_MODEL_NODES=n1,n2,n4 (every kind of node).
NODES = os.environ.get("DFS_MODEL_NODES", "n2,n4").split(",")


@pytest.mark.parametrize("node", NODES)
def test_model_on_a_cluster_node(cluster: Launcher, tmp_path: Path, node: str) -> None:
    mnt = {n: cluster.root / n / "mnt" / "model" for n in ("n1", "n2", "n3", "n4")}
    mnt[node].mkdir()
    local = tmp_path / "local"
    local.mkdir()
    run_model(mnt[node], local, CLUSTER_SETTINGS)
    here, reference = snapshot(str(mnt[node])), snapshot(str(local))
    assert here.entries == reference.entries, diff(here.entries, reference.entries)
    assert here.links == reference.links
    for other in sorted(set(mnt) - {node}):
        there = snapshot(str(mnt[other]))
        assert there.entries == here.entries, diff(there.entries, here.entries, (other, node))
        assert there.links == here.links
        assert there.times == here.times, diff(there.times, here.times, (other, node))
    assert not cluster.bugs(), cluster.logs()
