"""The seeded fault harness (issue 10, item 8): real dfs nodes over a simulated network.

Each seed builds a cluster (3 to 25 nodes, the root volume and 1-3 more with their own
primaries and sites), runs clients on several nodes while the network delays, resets,
reorders, duplicates and partitions, and nodes crash and restart; then heals, restarts
everything, lets replication settle on the mock clock and checks the invariants listed in
``tests/sim/schedule.py``.

CI runs seeds 1..DEFAULT_SEEDS; ``DFS_SIM_SEEDS=N`` runs 1..N; ``DFS_SIM_SEED=S`` replays one;
``DFS_SIM_EAGER=1`` starts the clients as soon as the volumes are created (``run_schedule``).
A failure prints the seed, its schedule and the command that replays it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.sim.schedule import Report, run_schedule

DEFAULT_SEEDS = 150

# Seeds whose schedule breaks an invariant of today's code: kept, to be fixed in dfs/cluster
# (strict: each must fail until then; a fix turns it into an XPASS failure: move it to FIXED).
# seed -> (eager, what breaks); ``eager``: clients start as soon as volume.create returned.
KNOWN_BUGS: dict[int, tuple[bool, str]] = {}

NEW_VOLUME = (
    "a site of a just-created volume whose replica lacks the volume's root yet answered the "
    "lookup of the mount point with ENOENT (no inode) instead of asking the primary"
)
OUT_OF_SYNC_FORWARD = (
    "a site out of sync forwarded a create: the primary answered seq 0, the site neither "
    "waited for its replica nor marked the volume behind, opened the new inode locally, and "
    "the next fsync failed ENOENT (no inode)"
)
STALLED_POSTS = (
    "posted writes on a connection a partition held were neither answered nor failed, and "
    "WriteBehind.drain waited for them without a deadline: clients cut off never finished"
)
COVERED_MOUNT_POINT = (
    "a storage site of the root volume that had not got the mount of a new volume yet read the "
    "mount point from the primary as the plain directory it covers, and its creates there "
    "were acknowledged: files lost to sight under the volume's root"
)
TWO_HANDOVERS = (
    "two promotions of one volume at once: the second replaced the first's hand-over gate, "
    "the first's end removed it, the second's end failed (internal error) and calls waiting "
    "on its gate waited for their deadline"
)
INHERITED_DIRTY = (
    "a primary died with a file written and not settled (its settle record was never "
    "acknowledged and was rolled back): its successors never computed the digests, and a "
    "site that caught up later had blocks with data and no checksum"
)
# Seeds that found bugs since fixed, replayed in the mode that found them (regressions).
FIXED: dict[int, tuple[bool, str]] = {
    20: (True, NEW_VOLUME),
    29: (True, NEW_VOLUME),
    30: (True, NEW_VOLUME),
    113: (False, OUT_OF_SYNC_FORWARD),
    120: (False, OUT_OF_SYNC_FORWARD),
    149: (False, OUT_OF_SYNC_FORWARD),
    165: (False, STALLED_POSTS),
    307: (True, COVERED_MOUNT_POINT),
    360: (False, TWO_HANDOVERS),
    593: (False, INHERITED_DIRTY),
}


def _tmp() -> str | None:
    """Stores in memory when possible: the harness fsyncs as the nodes do (3x faster)."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def _seeds() -> list[int]:
    one = os.environ.get("DFS_SIM_SEED")
    if one is not None:
        return [int(one)]
    n = int(os.environ.get("DFS_SIM_SEEDS", DEFAULT_SEEDS))
    return [s for s in range(1, n + 1) if s not in KNOWN_BUGS or KNOWN_BUGS[s][0]]


def _explain(r: Report, violations: list[str], replay: str = "") -> str:
    replay = replay or (
        f"DFS_SIM_SEED={r.seed} .venv/bin/pytest tests/sim/test_sim.py -k test_schedule"
    )
    return "\n".join(
        [
            f"seed {r.seed}: {r.nodes} nodes, {r.volumes} volumes; {len(violations)} violation(s):",
            *("  " + v for v in violations[:20]),
            "schedule:",
            *("  " + e for e in r.events),
            f"network: {r.stats}",
            f"replay: {replay}",
        ]
    )


@pytest.mark.parametrize("seed", _seeds())
def test_schedule(seed: int) -> None:
    eager = os.environ.get("DFS_SIM_EAGER") == "1"
    with tempfile.TemporaryDirectory(prefix="dfs-sim-", dir=_tmp()) as d:
        r = run_schedule(seed, Path(d), eager=eager)
    replay = f"DFS_SIM_EAGER=1 DFS_SIM_SEED={seed} .venv/bin/pytest tests/sim -k test_schedule"
    assert not r.violations, _explain(r, r.violations, replay if eager else "")
    assert r.acked > 0 or r.failed > 0, "no client did anything"


if KNOWN_BUGS:  # (none known now: no empty test that would only be skipped)

    @pytest.mark.parametrize(
        "seed",
        [
            pytest.param(s, marks=pytest.mark.xfail(strict=True, reason=why))
            for s, (_, why) in KNOWN_BUGS.items()
        ],
    )
    def test_known_bug(seed: int) -> None:
        with tempfile.TemporaryDirectory(prefix="dfs-sim-", dir=_tmp()) as d:
            r = run_schedule(seed, Path(d), eager=KNOWN_BUGS[seed][0])
        assert not r.violations, _explain(
            r, r.violations, f".venv/bin/pytest 'tests/sim/test_sim.py::test_known_bug[{seed}]'"
        )


@pytest.mark.parametrize("seed", list(FIXED))
def test_fixed_bug(seed: int) -> None:
    with tempfile.TemporaryDirectory(prefix="dfs-sim-", dir=_tmp()) as d:
        r = run_schedule(seed, Path(d), eager=FIXED[seed][0])
    assert not r.violations, _explain(
        r, r.violations, f".venv/bin/pytest 'tests/sim/test_sim.py::test_fixed_bug[{seed}]'"
    )


def test_checker_sees_volume_roots() -> None:
    """A site that joined a volume before its root existed records the root once it learns
    it: the checker finds that volume's root directory reachable (seed 2 has such a site)."""
    with tempfile.TemporaryDirectory(prefix="dfs-sim-", dir=_tmp()) as d:
        r = run_schedule(2, Path(d))
    assert not r.violations, _explain(
        r, r.violations, ".venv/bin/pytest tests/sim/test_sim.py -k test_checker_sees_volume_roots"
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_harness_sees_a_site_that_loses_records(seed: int) -> None:
    """A site that acknowledges records without applying them breaks the invariants."""
    with tempfile.TemporaryDirectory(prefix="dfs-sim-", dir=_tmp()) as d:
        r = run_schedule(seed, Path(d), liar=True)
    assert any("differs from primary" in v or "did not converge" in v for v in r.violations), (
        r.violations
    )
