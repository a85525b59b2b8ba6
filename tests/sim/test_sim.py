"""The seeded fault harness (issue 10, item 8): real dfs nodes over a simulated network.

Each seed builds a cluster (3 to 25 nodes, the root volume and 1-3 more with their own
primaries and sites), runs clients on several nodes while the network delays, resets,
reorders, duplicates and partitions, and nodes crash and restart; then heals, restarts
everything, lets replication settle on the mock clock and checks the invariants listed in
``tests/sim/schedule.py``.

CI runs seeds 1..DEFAULT_SEEDS; ``DFS_SIM_SEEDS=N`` runs 1..N; ``DFS_SIM_SEED=S`` replays one.
A failure prints the seed, its schedule and the command that replays it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.sim.schedule import Report, run_schedule

DEFAULT_SEEDS = 40

# Seeds whose schedule breaks an invariant of today's replication: kept, reported, to be
# fixed in dfs/cluster (strict: they must fail until then). See the report on branch `sim`.
KNOWN_BUGS: dict[int, str] = {
    10: "an acknowledged create is missing on the volume's sites after heal",
    15: "acknowledged creates are missing on the volume's sites after heal",
    20: "a client's lookup of a volume's mount point: ENOENT (no inode) instead of a legal error",
    30: "a client's lookup of a volume's mount point: ENOENT (no inode) instead of a legal error",
    56: "lookup of a volume / create in it: ENOENT (no inode) on a node",
}
# A checker finding every second schedule shows: a volume's root directory on a store reads
# as 'unreachable' (it has no dirent: the mount point covers it). Filtered in the sweep,
# shown unfiltered by test_checker_sees_volume_roots (xfail).
KNOWN_FINDING = "directory has no name"


def _seeds() -> list[int]:
    one = os.environ.get("DFS_SIM_SEED")
    if one is not None:
        return [int(one)]
    n = int(os.environ.get("DFS_SIM_SEEDS", DEFAULT_SEEDS))
    return [s for s in range(1, n + 1) if s not in KNOWN_BUGS]


def _explain(r: Report, violations: list[str]) -> str:
    return "\n".join(
        [
            f"seed {r.seed}: {r.nodes} nodes, {r.volumes} volumes; {len(violations)} violation(s):",
            *("  " + v for v in violations[:20]),
            "schedule:",
            *("  " + e for e in r.events),
            f"network: {r.stats}",
            f"replay: DFS_SIM_SEED={r.seed} .venv/bin/pytest tests/sim/test_sim.py"
            " -k test_schedule",
        ]
    )


@pytest.mark.parametrize("seed", _seeds())
def test_schedule(seed: int, tmp_path: Path) -> None:
    r = run_schedule(seed, tmp_path)
    bad = [v for v in r.violations if KNOWN_FINDING not in v]
    assert not bad, _explain(r, bad)
    assert r.acked > 0 or r.failed > 0, "no client did anything"


@pytest.mark.parametrize(
    "seed",
    [
        pytest.param(s, marks=pytest.mark.xfail(strict=True, reason=why))
        for s, why in KNOWN_BUGS.items()
    ],
)
def test_known_bug(seed: int, tmp_path: Path) -> None:
    r = run_schedule(seed, tmp_path)
    bad = [v for v in r.violations if KNOWN_FINDING not in v]
    assert not bad, _explain(r, bad)


@pytest.mark.xfail(strict=True, reason="checker: a volume's root directory reads as unreachable")
def test_checker_sees_volume_roots(tmp_path: Path) -> None:
    r = run_schedule(2, tmp_path)
    assert not r.violations, _explain(r, r.violations)
