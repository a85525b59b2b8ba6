"""Failover through real mounts: the primary's daemon killed, or its node cut off by a partition.

Three real daemons (``dfs cluster up``; with ``--netns`` for the partition). Through the mounts,
with ordinary file operations: what was acknowledged before the failure is on every node after
it; updates work again on the surviving nodes once a new primary is elected (retried, without
a timed assertion: how long it takes is measured by bench/failover.py); the old primary comes
back as a site of the new epoch with every replica identical; and an update the cut-off
primary made without a majority is refused, rolled back when it returns, and listed by
``dfs volume rolled-back``.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fuse.clusters import Launcher, assert_same_everywhere, launched
from tests.fuse.test_netns import _need_namespaces, _ours, _up
from tests.waiting import wait_until

pytestmark = [pytest.mark.fuse, pytest.mark.slow]


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Launcher]:
    with launched(
        tmp_path / "c", show_logs=lambda: getattr(request.node, "rep_call_failed", False)
    ) as launcher:
        yield launcher


def _mnt(c: Launcher, node: str) -> Path:
    return c.root / node / "mnt"


def _volumes(c: Launcher, node: str) -> list[dict[str, Any]]:
    r = c.dfs_tool("volume", "list", "--json", "--mount", str(_mnt(c, node)))
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout))


def _root(c: Launcher, node: str) -> dict[str, Any]:
    return next(v for v in _volumes(c, node) if v["vol"] == 1)


def _mkdir_works(path: Path) -> bool:
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        return True
    except OSError as exc:
        assert exc.errno in (errno.EROFS, errno.ETIMEDOUT, errno.EHOSTDOWN, errno.EIO), exc
        return False


def test_the_primary_killed_a_site_takes_over_and_nothing_acknowledged_is_lost(
    cluster: Launcher,
) -> None:
    assert cluster.up().returncode == 0
    m = {n: _mnt(cluster, n) for n in ("n1", "n2", "n3")}
    for n, mnt in m.items():
        (mnt / f"before-{n}").write_bytes(os.urandom(3000) + n.encode())
        with open(mnt / "log", "a") as f:
            f.write(f"{n}\n")
            f.flush()
            os.fsync(f.fileno())
    before = assert_same_everywhere(m, "n1")
    assert cluster.dfs("stop", "n1", "--kill").returncode == 0
    for n in ("n2", "n3"):
        target = m[n] / f"after-{n}"
        wait_until(f"updates on {n}", lambda target=target: _mkdir_works(target), limit=60)
    root = _root(cluster, "n2")
    assert root["primary"] in ("n2", "n3") and root["epoch"] >= 2, root
    assert _root(cluster, "n3")["primary"] == root["primary"]
    for n in ("n2", "n3"):
        for k in ("n1", "n2", "n3"):
            assert (m[n] / f"before-{k}").read_bytes().endswith(k.encode())
        assert (m[n] / "log").read_text() == "n1\nn2\nn3\n"
    # The old primary comes back as a site of the new epoch and catches up.
    assert cluster.dfs("start", "n1").returncode == 0
    wait_until(
        "n1 follows the new primary",
        lambda: _root(cluster, "n1")["primary"] == root["primary"],
        limit=60,
    )
    assert _root(cluster, "n1")["role"] == "site"
    wait_until("n1 sees after-n3", lambda: (m["n1"] / "after-n3").is_dir(), limit=60)
    (m["n1"] / "from-n1").write_text("again")
    after = assert_same_everywhere(m, root["primary"])
    assert set(before) <= set(after)
    assert cluster.status()[0] == 0


def test_a_primary_cut_off_is_replaced_and_rolls_back_what_it_could_not_replicate(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    _need_namespaces()
    root_dir = tmp_path / "c"
    try:
        with launched(
            root_dir, show_logs=lambda: getattr(request.node, "rep_call_failed", False)
        ) as c:
            assert _up(c).returncode == 0
            m = {n: _mnt(c, n) for n in ("n1", "n2", "n3")}
            (m["n2"] / "acked").write_text("on a majority")
            assert c.dfs("partition", "n1", "n2,n3").returncode == 0
            # The cut-off primary cannot get a majority: its update fails, never acknowledged.
            with pytest.raises(OSError) as e:
                os.mkdir(m["n1"] / "lost")
            assert e.value.errno in (errno.ETIMEDOUT, errno.EROFS), e.value
            wait_until("updates on n2", lambda: _mkdir_works(m["n2"] / "majority"), limit=60)
            new = _root(c, "n2")
            assert new["primary"] in ("n2", "n3") and new["epoch"] >= 2, new
            assert c.dfs("partition", "--heal").returncode == 0
            wait_until(
                "n1 follows the new primary",
                lambda: _root(c, "n1")["primary"] == new["primary"],
                limit=60,
            )
            wait_until("n1 rolled back", lambda: not (m["n1"] / "lost").exists(), limit=60)
            wait_until("n1 caught up", lambda: (m["n1"] / "majority").is_dir(), limit=60)
            assert (m["n1"] / "acked").read_text() == "on a majority"
            r = c.dfs_tool("volume", "rolled-back", "--json", "--mount", str(m["n1"]))
            assert r.returncode == 0, r.stderr
            kept = json.loads(r.stdout)
            assert len(kept) == 1 and "+lost" in kept[0]["entries"], kept
            assert Path(kept[0]["dir"], "manifest.json").exists()
            assert_same_everywhere(m, new["primary"])
    finally:
        left, _links = _ours(root_dir)
        assert not left, left


def test_promote_switches_the_primary_while_files_are_written(cluster: Launcher) -> None:
    """``dfs volume promote``: a planned switch-over while a file is held open for writing on
    a site and another node makes updates in a loop: no update fails, the file's writes go on
    through the new primary, nothing is lost, and ``dfs volume list`` shows the new epoch."""
    assert cluster.up().returncode == 0
    m = {n: _mnt(cluster, n) for n in ("n1", "n2", "n3")}
    failures: list[OSError] = []
    made: list[str] = []
    stop = threading.Event()

    def updates() -> None:
        i = 0
        while not stop.is_set():
            try:
                os.mkdir(m["n3"] / f"d{i}")
                made.append(f"d{i}")
            except OSError as exc:
                failures.append(exc)
            i += 1

    # Held open on a site and on the node to be promoted, both writing through n1.
    with open(m["n2"] / "held", "wb") as f, open(m["n3"] / "held3", "wb") as f3:
        for h in (f, f3):
            h.write(b"before\n")
            h.flush()
            os.fsync(h.fileno())
        f3.write(b"posted ")  # in flight through n1 (unflushed) when the switch comes
        f3.flush()
        worker = threading.Thread(target=updates)
        worker.start()
        try:
            wait_until("updates under way", lambda: len(made) > 5, limit=30)
            r = cluster.dfs_tool("volume", "promote", str(m["n1"]), "n3", "--json")
            assert r.returncode == 0, r.stderr
            done = json.loads(r.stdout)
            count = len(made)
            wait_until("updates go on", lambda: len(made) > count + 5, limit=30)
        finally:
            stop.set()
            worker.join()
        for h in (f, f3):
            h.write(b"after\n")
            h.flush()
            os.fsync(h.fileno())
    assert done["primary"] == "n3" and done["was"] == "n1" and done["epoch"] == 2, done
    assert not failures, failures[:3]
    for n in ("n1", "n2", "n3"):
        wait_until(f"{n} follows n3", lambda n=n: _root(cluster, n)["primary"] == "n3", limit=30)
    assert _root(cluster, "n1")["role"] == "site"
    table = cluster.dfs_tool("volume", "list", "--mount", str(m["n2"]))
    assert table.returncode == 0, table.stderr
    row = next(line.split() for line in table.stdout.splitlines() if line.split()[:2] == ["1", "/"])
    assert row[2:4] == ["n3", "2"], table.stdout  # PRIMARY, EPOCH
    for n in ("n1", "n2", "n3"):
        wait_until(
            f"{n} has the whole files",
            lambda n=n: (
                (m[n] / "held").read_bytes() == b"before\nafter\n"
                and (m[n] / "held3").read_bytes() == b"before\nposted after\n"
            ),
            limit=30,
        )
        assert set(made) <= {p.name for p in m[n].iterdir()}
    assert_same_everywhere(m, "n3")
    # Refused, with the reason, and nothing changes.
    bad = cluster.dfs_tool("volume", "promote", str(m["n1"]), "n9")
    assert bad.returncode == 1 and "unknown node n9" in bad.stderr, bad.stderr
    assert _root(cluster, "n2")["primary"] == "n3"
