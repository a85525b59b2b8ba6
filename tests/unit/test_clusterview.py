"""``dfs status``: the cluster's picture from every node's status, its JSON and its text.

The statuses are shaped as nodes answer them (dfs/cluster/node.py ``status`` with the
``replication`` and ``files`` sections of dfs/cluster/service.py); the real ones are
checked through real mounts in tests/fuse/test_status.py.
"""

from __future__ import annotations

import json
from typing import Any

from click.testing import CliRunner
from dfs_tools import status as T
from dfs_tools.cli import main

from dfs.cluster import clusterview as V

NODES = ("n1", "n2", "n3")


def peer(name: str, ok: bool = True, kind: str = "timeout") -> dict[str, Any]:
    return {
        "name": name,
        "state": "reachable" if ok else "unreachable",
        "reachable": ok,
        "error_kind": None if ok else kind,
        "rtt_ms": 0.5 if ok else None,
    }


def site_state(site: str, applied: int, top: int, **kw: Any) -> dict[str, Any]:
    out = {
        "site": site,
        "applied": applied,
        "in_sync": applied == top,
        "diverged": False,
        "error": "",
        "lag": top - applied,
        "lease": 2.5 if applied == top else 0.0,
    }
    out.update(kw)
    return out


def status(
    name: str,
    *,
    cannot: tuple[str, ...] = (),
    role: str = "site",
    primary: str = "n1",
    epoch: int = 1,
    applied: int = 10,
    sites_state: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    vol: dict[str, Any] = {
        "vol": 1,
        "path": "/",
        "root": 1,
        "primary": primary,
        "sites": list(NODES),
        "epoch": epoch,
        "role": role,
        "applied": applied,
    }
    if role == "primary":
        vol["sites_state"] = sites_state or []
    else:
        vol["lease"] = True
    vol.update(extra)
    return {
        "node": name,
        "cluster": "lab",
        "cluster_id": "cid",
        "address": f"10.0.0.{name[1]}:7801",
        "pid": 100 + int(name[1]),
        "uptime": 3723.0,
        "mount": "/mnt/dfs",
        "metrics": None,
        "peers": [peer(p, p not in cannot) for p in NODES if p != name],
        "rpc": {"requests_served": 5},
        "replication": {
            "volumes": [vol],
            "checksum_failures": 0,
            "read_repairs": 0,
            "elections": 0,
            "rollbacks": 0,
        },
        "files": {"local": 2, "remote": 1},
    }


def healthy() -> list[dict[str, Any]]:
    return [
        {
            "node": "n1",
            "status": status(
                "n1",
                role="primary",
                sites_state=[site_state("n2", 10, 10), site_state("n3", 10, 10)],
            ),
        },
        {"node": "n2", "status": status("n2")},
        {"node": "n3", "status": status("n3")},
    ]


def test_a_healthy_cluster() -> None:
    view = V.cluster_view(healthy(), asked="n1")
    assert view["health"] == "ok" and view["problems"] == []
    assert [n["name"] for n in view["nodes"]] == list(NODES)
    assert all(n["reached"] and n["unreachable"] == [] for n in view["nodes"])
    (vol,) = view["volumes"]
    assert (vol["vol"], vol["path"], vol["primary"], vol["epoch"]) == (1, "/", "n1", 1)
    assert vol["primary_reached"] and vol["claims"] == [] and vol["last_check"] is None
    assert [(s["node"], s["state"], s["applied"], s["lag"]) for s in vol["sites"]] == [
        ("n1", "primary", 10, 0),
        ("n2", "in sync", 10, 0),
        ("n3", "in sync", 10, 0),
    ]
    assert vol["sites"][1]["lease_left"] == 2.5 and vol["sites"][1]["lease"] is True
    assert view["totals"] == {
        "checksum_failures": 0,
        "read_repairs": 0,
        "elections": 0,
        "rollbacks": 0,
    }
    json.dumps(view)  # JSON-able as it is


def test_a_dead_node_is_unreachable_everywhere_and_its_site_too() -> None:
    reports = [
        {
            "node": "n1",
            "status": status(
                "n1",
                cannot=("n3",),
                role="primary",
                applied=14,
                # The primary still counts it in sync (nothing was sent since it died).
                sites_state=[site_state("n2", 14, 14), site_state("n3", 14, 14)],
            ),
        },
        {"node": "n2", "status": status("n2", cannot=("n3",), applied=14)},
        {"node": "n3", "error": "node n3: connection refused", "error_kind": "unreachable"},
    ]
    view = V.cluster_view(reports, asked="n1")
    assert view["health"] == "degraded"
    assert view["problems"][0] == (
        "node n3: not reached from n1 (unreachable); n2 cannot reach it either (timeout)"
    )
    assert "volume / (1): site n3 unreachable" in view["problems"]
    n3 = view["nodes"][2]
    assert not n3["reached"] and n3["error_kind"] == "unreachable"
    assert view["nodes"][0]["unreachable"] == ["n3"]
    sites = view["volumes"][0]["sites"]
    assert sites[2]["state"] == "unreachable" and sites[2]["in_sync"] is True


def test_after_a_failover_the_newest_epoch_names_the_primary_and_an_old_claim_shows() -> None:
    # n1 cut off (a partition) still acts as primary in epoch 1; n2 won epoch 2. Asked
    # from here (--config), both sides answered.
    reports = [
        {
            "node": "n1",
            "status": status(
                "n1",
                cannot=("n2", "n3"),
                role="primary",
                applied=12,
                sites_state=[site_state("n2", -1, 12), site_state("n3", -1, 12)],
            ),
        },
        {
            "node": "n2",
            "status": status(
                "n2",
                cannot=("n1",),
                role="primary",
                primary="n2",
                epoch=2,
                applied=20,
                sites_state=[site_state("n1", 10, 20), site_state("n3", 20, 20)],
            ),
        },
        {"node": "n3", "status": status("n3", cannot=("n1",), primary="n2", epoch=2, applied=20)},
    ]
    view = V.cluster_view(reports, asked=None)
    (vol,) = view["volumes"]
    assert (vol["primary"], vol["epoch"], vol["primary_reached"]) == ("n2", 2, True)
    assert vol["claims"] == [{"node": "n1", "epoch": 1}]
    assert any("n1 still acts as its primary in epoch 1" in p for p in view["problems"])
    states = {s["node"]: s["state"] for s in vol["sites"]}
    assert states == {"n1": "unreachable", "n2": "primary", "n3": "in sync"}
    assert any(p.startswith("node n1: n2, n3 cannot reach it") for p in view["problems"])


def test_a_primary_not_reached_leaves_its_sites_without_a_verdict() -> None:
    reports = [
        {"node": "n1", "error": "no answer", "error_kind": "timeout"},
        {"node": "n2", "status": status("n2", cannot=("n1",))},
        {"node": "n3", "status": status("n3", cannot=("n1",))},
    ]
    view = V.cluster_view(reports, asked="n2")
    (vol,) = view["volumes"]
    assert not vol["primary_reached"]
    assert [s["state"] for s in vol["sites"]] == ["unreachable", V.NO_PRIMARY, V.NO_PRIMARY]
    assert "volume / (1): its primary n1 (epoch 1) is not reached" in view["problems"]


def test_behind_diverged_and_read_only() -> None:
    reports = healthy()
    reports[0]["status"]["replication"]["volumes"][0]["sites_state"] = [
        site_state("n2", 7, 10),
        site_state("n3", 3, 10, diverged=True, error="diverged after update 3"),
    ]
    view = V.cluster_view(reports, asked="n1")
    sites = {s["node"]: s for s in view["volumes"][0]["sites"]}
    assert (sites["n2"]["state"], sites["n2"]["lag"]) == ("behind", 3)
    assert sites["n3"]["state"] == "diverged" and sites["n3"]["error"]
    assert "volume / (1): 1 of its 3 sites in sync, updates need 2: read-only" in view["problems"]
    assert "volume / (1): site n2 behind, 3 updates behind" in view["problems"]


def test_hooks_for_check_and_heal_are_empty_safe() -> None:
    reports = healthy()
    vols = reports[0]["status"]["replication"]["volumes"]
    vols[0]["sites_state"][1]["heal"] = {"done": 250, "total": 1000, "eta": 90}
    vols[0]["sites_state"][1]["in_sync"] = False
    reports[1]["status"]["replication"]["volumes"][0]["check"] = {"time": 1.7e9, "result": "clean"}
    reports[2]["status"]["replication"]["volumes"][0]["check"] = {"time": 1.6e9, "result": "old"}
    view = V.cluster_view(reports, asked="n1")
    vol = view["volumes"][0]
    assert vol["last_check"] == {"time": 1.7e9, "result": "clean"}
    assert vol["sites"][2]["state"] == "healing" and vol["sites"][2]["heal"]["done"] == 250
    text = "\n".join(T.render_view(view))
    assert "healing 25% (250/1000) eta 1m30s" in text and " clean" in text
    assert "never" in "\n".join(T.render_view(V.cluster_view(healthy(), asked="n1")))


def test_checksum_failures_not_repaired_are_a_problem() -> None:
    reports = healthy()
    rep = reports[1]["status"]["replication"]
    rep["checksum_failures"], rep["read_repairs"] = 3, 2
    view = V.cluster_view(reports, asked="n1")
    assert view["totals"]["checksum_failures"] == 3
    assert any(p.startswith("node n2: 1 block(s) failed their checksum") for p in view["problems"])


def test_the_text_is_read_at_a_glance_and_plain_off_a_terminal() -> None:
    reports = healthy()
    reports[2] = {"node": "n3", "error": "refused", "error_kind": "unreachable"}
    for r in reports[:2]:
        for p in r["status"]["peers"]:
            if p["name"] == "n3":
                p.update(peer("n3", False, "unreachable"))
    view = V.cluster_view(reports, asked="n1")
    lines = T.render_view(view, when=0)
    assert lines[0].startswith("cluster lab: 3 nodes, 1 volume; asked n1 at ")
    assert lines[1] == "health: DEGRADED"
    assert lines[2].startswith("  - node n3: not reached from n1")
    assert not any("\x1b" in line for line in lines)
    node_rows = {ln.split()[0]: ln for ln in lines if ln[:2] in ("n1", "n2", "n3")}
    assert node_rows["n1"].split()[1:5] == ["up", "10.0.0.1:7801", "1h02m", "n2"]
    assert "n3 UNREACHABLE (unreachable)" in node_rows["n1"]
    assert node_rows["n3"].split()[:2] == ["n3", "UNREACHABLE"]
    vol_row = next(ln for ln in lines if ln.split()[:2] == ["1", "/"])
    assert vol_row.split()[2:7] == ["n1", "1", "n1", "primary", "10"]
    assert any("\x1b[" in line for line in T.render_view(view, colour=True))


def test_dfs_volume_list_and_dfs_status_name_site_states_alike() -> None:
    assert V.site_mark({"in_sync": True}) == "in sync"
    assert V.site_mark({"in_sync": False}) == "behind"
    assert V.site_mark({"in_sync": True, "diverged": True}) == "diverged"
    assert V.site_mark({"heal": {"done": 1, "total": 2}}) == "healing"


def test_usage() -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["status", "--config", "x.toml", "--mount", "/mnt"])
    assert r.exit_code == 2 and "not both" in r.output
    r = runner.invoke(main, ["status", "--config", "/nonexistent/cluster.toml"])
    assert r.exit_code == 2 and "no such configuration file" in r.output
    r = runner.invoke(main, ["status", "--count", "2"])
    assert r.exit_code == 2 and "--count goes with --watch" in r.output
    r = runner.invoke(main, ["status", "--mount", "/"], env={"DFS_MOUNT": ""})
    assert r.exit_code == 2 and "--config" in r.output
