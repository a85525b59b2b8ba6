"""The model-based test (tests/fuse/test_model.py) on nodes of a 4-node cluster.

The same hypothesis state machine applies random syscalls to one node's mount
and to a local directory and compares every result, errno and the trees. n2 is
a storage site, not the primary: each update is forwarded to n1, writes are
held and posted, reads of files with writes in flight go to the primary, and
n2 waits for its own replica. n4 stores no replica (the root volume has three):
it reads everything from n1, with short kernel timeouts. n1 is the primary. At
the end the trees of every node must equal each other (entries, link groups,
inode numbers and times) and the local one.

A variant kills a storage site (n3, SIGKILL) again and again while the model
runs on n2 and restarts it a few examples later: updates must go on while it
is down, and its replica must catch up (seen through the host view
``MNT/.../n3/...``, which reads n3's own copy) and equal the primary's.
Long hunts: ``DFS_MODEL_EXAMPLES=500`` (and ``DFS_MODEL_DROP_CACHES=1``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from tests.fuse.clusters import Launcher, launched
from tests.fuse.test_model import MODEL_SETTINGS, Snapshot, diff, run_model, snapshot
from tests.waiting import wait_until

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

# Each step costs a replicated round trip or more: fewer examples than on one node in CI
# (about 30 s per node); DFS_MODEL_EXAMPLES=N (see test_model.py) runs N with a fresh seed.
CLUSTER_SETTINGS = (
    MODEL_SETTINGS
    if os.environ.get("DFS_MODEL_EXAMPLES")
    else settings(MODEL_SETTINGS, max_examples=100)
)


NODES = ("n1", "n2", "n3", "n4")
REPLICAS = ("n1", "n2", "n3")  # of the root volume (three copies); n1 is its primary


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Launcher]:
    with launched(tmp_path / "c", nodes=4, show_logs=lambda: False) as launcher:
        r = launcher.up(nodes=4)
        assert r.returncode == 0, r.stdout + r.stderr + launcher.logs()
        yield launcher


# Every kind of node: n1 the primary, n2 a site, n4 no replica (DFS_MODEL_NODES=n2 for one).
NODES = os.environ.get("DFS_MODEL_NODES", "n1,n2,n4").split(",")


@pytest.mark.parametrize("node", NODES)
def test_model_on_a_cluster_node(cluster: Launcher, tmp_path: Path, node: str) -> None:
    mnt = {n: cluster.root / n / "mnt" / "model" for n in NODES}
    mnt[node].mkdir()
    local = tmp_path / "local"
    local.mkdir()
    run_model(mnt[node], local, CLUSTER_SETTINGS)
    here, reference = snapshot(str(mnt[node])), snapshot(str(local))
    assert here.entries == reference.entries, diff(here.entries, reference.entries)
    assert here.links == reference.links
    every_node_shows(cluster, here, node)
    assert not cluster.bugs(), cluster.logs()


def differences(a: Snapshot, b: Snapshot, names: tuple[str, str], *, inodes: bool = True) -> str:
    """What differs between two snapshots of one tree ('' if nothing); without ``inodes``
    only (mtime, ctime) are compared of the times (a host view has inode numbers of its own)."""

    def times(s: Snapshot) -> dict[str, Any]:
        return s.times if inodes else {p: (m, c) for p, (_, m, c) in s.times.items()}

    return "".join(
        f"{what} ({names[0]} / {names[1]}):\n{diff(x, y, names)}\n"
        for what, x, y in (
            ("entries", a.entries, b.entries),
            ("hard links", {"": sorted(map(sorted, a.links))}, {"": sorted(map(sorted, b.links))}),
            ("times", times(a), times(b)),
        )
        if x != y
    )


def every_node_shows(cluster: Launcher, want: Snapshot, origin: str) -> None:
    """Every mount's ``model`` tree equals ``want`` (seen on ``origin``): at once on the nodes
    that store a replica (read-after-return); on n4, which stores none, once its kernel's
    attribute and name cache of at most 1 s has run out (CONSISTENCY.md, "Nodes that store
    no replica")."""
    for other in sorted(set(NODES) - {origin}):
        path = str(cluster.root / other / "mnt" / "model")
        if other in REPLICAS:
            got = differences(snapshot(path), want, (other, origin))
            assert not got, got
        else:
            wait_until(
                f"{other} to show the tree {origin} shows",
                lambda path=path, other=other: differences(snapshot(path), want, (other, origin)),
                ok=lambda d: not d,
            )


# The site-kill variant: every KILL_EVERY examples, n3 is killed as example k starts and
# restarted as example k + DOWN_FOR starts (or when the run ends). CI: two cycles.
KILL_EVERY, DOWN_FOR = 6, 3
KILL_SETTINGS = (
    MODEL_SETTINGS
    if os.environ.get("DFS_MODEL_EXAMPLES")
    else settings(MODEL_SETTINGS, max_examples=2 * KILL_EVERY)
)


class SiteKiller:
    """Kills ``site`` (SIGKILL) and restarts it on a schedule of example numbers, from a
    thread of its own, so that the kill lands while the model's syscalls are in flight."""

    def __init__(self, cluster: Launcher, site: str) -> None:
        self.cluster, self.site = cluster, site
        self.started = threading.Condition()
        self.example = -1
        self.done = False
        self.kills = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run)

    def on_example(self, n: int) -> None:
        with self.started:
            self.example = n
            self.started.notify_all()

    def _wait_for(self, n: int) -> None:
        with self.started:
            self.started.wait_for(lambda: self.done or self.example >= n)

    def _run(self) -> None:
        k = 1
        while True:
            self._wait_for(k)
            if self.done:
                return
            r = self.cluster.dfs("stop", self.site, "--kill")
            if r.returncode != 0:
                self.errors.append(f"stop {self.site} --kill: {r.stdout}{r.stderr}")
                return
            self.kills += 1
            self._wait_for(k + DOWN_FOR)
            r = self.cluster.dfs("start", self.site)
            if r.returncode != 0:
                self.errors.append(f"start {self.site}: {r.stdout}{r.stderr}")
                return
            k += KILL_EVERY

    def __enter__(self) -> SiteKiller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.started:
            self.done = True
            self.started.notify_all()
        self.thread.join()


def test_model_while_a_site_is_killed_and_restarted(cluster: Launcher, tmp_path: Path) -> None:
    node, site = "n2", "n3"
    top = cluster.root / "n1" / "mnt"
    (top / "model").mkdir()
    local = tmp_path / "local"
    local.mkdir()
    with SiteKiller(cluster, site) as killer:
        run_model(cluster.root / node / "mnt" / "model", local, KILL_SETTINGS, killer.on_example)
    assert not killer.errors, killer.errors
    assert killer.kills >= 1
    reference = snapshot(str(local))
    # The primary's copy is the tree the model saw; the killed site's copy catches up to it.
    primary = snapshot(str(top / "..." / "n1" / "model"))
    assert primary.entries == reference.entries, diff(primary.entries, reference.entries)
    assert primary.links == reference.links

    wait_until(
        f"{site}'s replica equal to the primary's",
        lambda: differences(
            snapshot(str(top / "..." / site / "model")), primary, (site, "n1"), inodes=False
        ),
        ok=lambda d: not d,
        retry_on=(OSError,),
    )
    here = snapshot(str(top / "model"))  # and every mount shows that tree, with n1's inodes
    got = differences(here, primary, ("n1", "n1 view"), inodes=False)
    assert not got, got
    every_node_shows(cluster, here, "n1")
    assert not cluster.bugs(), cluster.logs()
