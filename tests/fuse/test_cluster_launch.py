"""``dfs cluster up/status/stop/start/down`` and ``dfs-mountd --config --node`` as users meet them.

Real daemons and mounts on loopback. Each test has its own directory and free
ports, and ALWAYS runs ``dfs cluster down`` at the end; the fixture then checks
that nothing is left mounted and no daemon it saw is left running, and fails
the test if a daemon logged an unexpected exception.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dfs.cluster.control import request
from dfs.config import init, load
from dfs.errors import BUG_MARKER
from dfs.meta.store import MetaStore
from dfs.mounts import force_unmount, mount_points
from dfs.types import NodeId
from mountd.daemon import EXIT_DATADIR, EXIT_FAILURE, EXIT_USAGE
from tests.fuse.clusters import (
    Launcher,
    free_base_port,
    is_our_daemon,
    launched,
    need_fuse,
)
from tests.mounting import MOUNTD, mountd, mounts_under
from tests.waiting import wait_until

pytestmark = pytest.mark.fuse


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Launcher]:
    with launched(
        tmp_path / "c", show_logs=lambda: getattr(request.node, "rep_call_failed", False)
    ) as launcher:
        yield launcher


def assert_live(mnt: Path) -> None:
    assert str(mnt) in mount_points()
    assert os.stat(mnt).st_dev != os.stat(mnt.parent).st_dev
    os.listdir(mnt)


def peer_states(node: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["state"] for p in node["peers"]}


# --- the launcher --------------------------------------------------------------------------------


@pytest.mark.slow
def test_up_status_kill_start_down(cluster: Launcher) -> None:
    r = cluster.up()
    assert r.returncode == 0, r.stderr
    assert "dfs cluster is up: 3 nodes" in r.stdout and "Try:" in r.stdout
    # The hints are commands that work when pasted (`dfs` need not be on PATH).
    (hint,) = [ln.split("#")[0] for ln in r.stdout.splitlines() if " cluster status " in ln]
    pasted = subprocess.run(hint, shell=True, capture_output=True, text=True, timeout=60)
    assert pasted.returncode == 0, f"{hint}: {pasted.stderr}"
    assert pasted.stdout.split()[:2] == ["NODE", "ADDRESS"], pasted.stdout
    root = cluster.root
    for name in ("n1", "n2", "n3"):
        assert f"{root / name / 'mnt'}" in r.stdout
        assert_live(root / name / "mnt")
        assert (root / name / "data" / "control.sock").exists()
    assert (root / "cluster.toml").exists()
    assert (os.stat(root / "cluster.secret").st_mode & 0o777) == 0o600
    state = json.loads((root / "state.json").read_text())
    assert set(state["nodes"]) == {"n1", "n2", "n3"}

    # Every node runs and, as `up` promised, reaches every other one.
    code, doc = cluster.status()
    assert code == 0 and doc["all_running"] is True
    nodes = {n["name"]: n for n in doc["nodes"]}
    for i, name in enumerate(("n1", "n2", "n3")):
        n = nodes[name]
        assert n["state"] == "running" and n["mount"] == "live" and n["pid"]
        assert n["address"] == f"127.0.0.1:{cluster.base_port + i}"
        assert n["pid"] == state["nodes"][name]["pid"]
        assert peer_states(n) == {o: "reachable" for o in nodes if o != name}
        assert not any(p["auth_failed"] for p in n["peers"])
    text = cluster.dfs("status")
    assert text.returncode == 0 and "n2 ok" in text.stdout
    pids = {name: n["pid"] for name, n in nodes.items()}

    # A second `up` starts nothing.
    again = cluster.up()
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout
    assert {n: v["pid"] for n, v in cluster.nodes().items()} == pids

    # Something to find again after the crash.
    (root / "n2" / "mnt" / "kept.txt").write_text("written before kill -9\n")

    # Crash n2: its mount goes stale, the others see it go within a few heartbeats.
    r = cluster.dfs("stop", "n2", "--kill")
    assert r.returncode == 0, r.stderr
    assert not is_our_daemon(pids["n2"], cluster.config)
    code, doc = cluster.status()
    assert code == 3 and doc["all_running"] is False
    n2 = {n["name"]: n for n in doc["nodes"]}["n2"]
    assert n2["state"] == "dead" and n2["pid"] is None and n2["mount"] == "stale"
    nodes = cluster.wait(
        "n1 and n3 report n2 unreachable",
        lambda ns: all(peer_states(ns[o]).get("n2") == "unreachable" for o in ("n1", "n3")),
    )
    for o in ("n1", "n3"):
        row = {p["name"]: p for p in nodes[o]["peers"]}["n2"]
        assert row["error_kind"] == "unreachable" and not row["auth_failed"]
        assert peer_states(nodes[o])[{"n1": "n3", "n3": "n1"}[o]] == "reachable"
    assert "UNREACHABLE" in cluster.dfs("status").stdout

    # Start it again: the stale mount is recovered, its data is there, all reachable again.
    r = cluster.dfs("start", "n2")
    assert r.returncode == 0, r.stderr + cluster.logs()
    assert_live(root / "n2" / "mnt")
    assert (root / "n2" / "mnt" / "kept.txt").read_text() == "written before kill -9\n"
    assert len([p for p in mount_points() if p == str(root / "n2" / "mnt")]) == 1
    nodes = cluster.wait(
        "every node reaches every other",
        lambda ns: all(set(peer_states(n).values()) == {"reachable"} for n in ns.values()),
    )
    assert nodes["n2"]["pid"] != pids["n2"] and nodes["n1"]["pid"] == pids["n1"]
    assert "stale mount" in (root / "n2" / "mountd.log").read_text()
    r = cluster.dfs("start", "n2")
    assert r.returncode == 0 and "already running" in r.stdout

    # A clean stop of one node unmounts it.
    r = cluster.dfs("stop", "n3")
    assert r.returncode == 0, r.stderr
    assert str(root / "n3" / "mnt") not in mount_points()
    assert cluster.nodes()["n3"]["mount"] == "none"

    # Down: nothing mounted, no daemon left; and down again is harmless.
    r = cluster.dfs("down")
    assert r.returncode == 0, r.stderr
    assert not mounts_under(root)
    assert not [p for p in cluster.seen_pids if is_our_daemon(p, cluster.config)]
    code, doc = cluster.status()
    assert code == 3 and {n["state"] for n in doc["nodes"]} == {"dead"}
    r = cluster.dfs("down")
    assert r.returncode == 0 and "not running" in r.stdout


def test_down_after_nodes_died(cluster: Launcher) -> None:
    assert cluster.up().returncode == 0
    before = cluster.nodes()
    for name in ("n1", "n3"):
        assert cluster.dfs("stop", name, "--kill").returncode == 0
    nodes = cluster.nodes()
    assert [nodes[n]["mount"] for n in ("n1", "n2", "n3")] == ["stale", "live", "stale"]
    r = cluster.dfs("down")
    assert r.returncode == 0, r.stderr
    assert "stale mount removed" in r.stdout
    assert not mounts_under(cluster.root)
    assert not [n["pid"] for n in before.values() if is_our_daemon(n["pid"], cluster.config)]
    # Stopping a node that is not running is not an error either.
    r = cluster.dfs("stop", "n2")
    assert r.returncode == 0 and "not running" in r.stdout


def test_up_fails_cleanly_when_a_port_is_taken(cluster: Launcher) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", cluster.base_port + 1))  # n2's port
    taken.listen()
    try:
        r = cluster.up()
    finally:
        taken.close()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "node n2: dfs-mountd exited with status 1" in r.stderr, r.stderr
    assert "cannot listen on" in r.stderr and "another process uses this port" in r.stderr
    assert not mounts_under(cluster.root)  # n1 and n3 were stopped again
    code, doc = cluster.status()
    assert code == 3 and {n["state"] for n in doc["nodes"]} == {"dead"}
    assert json.loads((cluster.root / "state.json").read_text())["nodes"] == {}


def test_bad_usage(tmp_path: Path) -> None:
    need_fuse()
    launcher = Launcher(tmp_path / "c", 7801)
    r = launcher.dfs("status")
    assert r.returncode == 3 and "no cluster" in r.stdout
    r = launcher.dfs("start", "n1")
    assert r.returncode == 2 and "no cluster" in r.stderr
    r = launcher.dfs("down")
    assert r.returncode == 0 and "nothing to stop" in r.stdout
    assert not (tmp_path / "c" / "state.json").exists()


def test_unknown_node_and_other_size(cluster: Launcher) -> None:
    assert cluster.up(nodes=2).returncode == 0
    r = cluster.dfs("stop", "n9")
    assert r.returncode == 2 and "no node named 'n9'" in r.stderr
    r = cluster.up(nodes=3)
    assert r.returncode == 2 and "holds a cluster of 2 nodes" in r.stderr
    assert cluster.status()[0] == 0


# --- a node with the wrong secret ----------------------------------------------------------------


def test_a_node_with_the_wrong_secret_is_reported_not_crashing(
    cluster: Launcher, tmp_path: Path
) -> None:
    assert cluster.up().returncode == 0
    assert cluster.dfs("stop", "n3").returncode == 0
    root = cluster.root
    # n3 comes back with a copy of the configuration that names another secret.
    evil = root / "evil.toml"
    evil.write_text(
        cluster.config.read_text().replace('secret_file = "cluster.secret"', 'secret_file = "e"')
    )
    fd = os.open(root / "e", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"0123456789abcdef0123456789abcdef\n")
    os.close(fd)
    log = open(root / "n3" / "evil.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [*MOUNTD, "--config", str(evil), "--node", "n3", "--data", str(root / "n3" / "data")]
        + [str(root / "n3" / "mnt")],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:

        def n3_mounted() -> bool:
            assert proc.poll() is None, (root / "n3" / "evil.log").read_text()
            return str(root / "n3" / "mnt") in mount_points()

        wait_until("n3 (with the wrong secret) mounted", n3_mounted)

        def auth_failed(n: dict[str, Any], peer: str) -> bool:
            rows = {p["name"]: p for p in n["peers"]}
            return rows[peer]["state"] == "unreachable" and rows[peer]["auth_failed"] is True

        nodes = cluster.wait(
            "n1 and n2 report an auth failure of n3",
            lambda ns: auth_failed(ns["n1"], "n3") and auth_failed(ns["n2"], "n3"),
        )
        for name in ("n1", "n2"):
            assert nodes[name]["state"] == "running" and nodes[name]["mount"] == "live"
            assert peer_states(nodes[name])[{"n1": "n2", "n2": "n1"}[name]] == "reachable"
            row = {p["name"]: p for p in nodes[name]["peers"]}["n3"]
            assert "authentication failed" in row["error"]
        # n3 (not ours to the launcher now) sees the others refuse it, and keeps running.
        mine = wait_until(
            "n3 to see n1 and n2 refuse it",
            lambda: request(root / "n3" / "data" / "control.sock", "status"),
            ok=lambda st: all(auth_failed(st, p) for p in ("n1", "n2")),
        )
        assert mine["rpc"]["auth_failures"] >= 1
        for name in ("n1", "n2"):
            text = (root / name / "mountd.log").read_text()
            assert "authentication failed" in text
        assert proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
        if str(root / "n3" / "mnt") in mount_points():
            force_unmount(root / "n3" / "mnt")
    assert proc.returncode == 0
    evil_log = (root / "n3" / "evil.log").read_text()
    assert BUG_MARKER not in evil_log and "Traceback" not in evil_log


# --- dfs-mountd --config --node errors -----------------------------------------------------------


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    need_fuse()
    path = tmp_path / "cluster.toml"
    base = free_base_port(2)
    init(path, [("n1", "127.0.0.1", base), ("n2", "127.0.0.1", base + 1)], name="t")
    (tmp_path / "mnt").mkdir()
    return path


def refused(r: subprocess.CompletedProcess[str], code: int, *phrases: str) -> None:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == code, f"exit {r.returncode}, expected {code}:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in lines if "ERROR" in line or line.startswith("Error:")]
    assert len(errors) == 1, f"expected one error line:\n{r.stderr}"
    for phrase in phrases:
        assert phrase in errors[0], f"{phrase!r} not in {errors[0]!r}"


def test_unknown_node(cfg: Path) -> None:
    data = cfg.parent / "data"
    r = mountd(
        "--config", cfg, "--node", "nope", "--data", data, cfg.parent / "mnt", scope=cfg.parent
    )
    refused(r, EXIT_USAGE, "no node named 'nope'", "nodes: n1, n2")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not data.exists()


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        pytest.param(lambda t: t + "\n[bogus]\nx = 1\n", "unknown key(s) bogus", id="key"),
        pytest.param(lambda t: t.replace("port = ", "port = -", 1), "out of range", id="port"),
        pytest.param(lambda t: t.replace("[cluster]", "[cluster", 1), "not valid TOML", id="toml"),
        pytest.param(
            lambda t: t.replace('name = "n2"', 'name = "n1"'), "duplicate name 'n1'", id="dup"
        ),
    ],
)
def test_bad_config(cfg: Path, edit: Callable[[str], str], phrase: str) -> None:
    cfg.write_text(edit(cfg.read_text()))
    r = mountd(
        "--config",
        cfg,
        "--node",
        "n1",
        "--data",
        cfg.parent / "d",
        cfg.parent / "mnt",
        scope=cfg.parent,
    )
    refused(r, EXIT_USAGE, str(cfg), phrase)
    assert not (cfg.parent / "d").exists()


def test_missing_config_and_loose_secret(cfg: Path) -> None:
    mnt = cfg.parent / "mnt"
    r = mountd(
        "--config",
        cfg.parent / "nope.toml",
        "--node",
        "n1",
        "--data",
        cfg.parent / "d",
        mnt,
        scope=cfg.parent,
    )
    refused(r, EXIT_USAGE, "no such configuration file")
    os.chmod(cfg.with_suffix(".secret"), 0o644)
    r = mountd("--config", cfg, "--node", "n1", "--data", cfg.parent / "d", mnt, scope=cfg.parent)
    refused(r, EXIT_USAGE, "readable by others", "chmod 600")


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--node", "n1", "--data", "D"], "--node needs --config"),
        (["--config", "CFG"], "--config needs --node"),
        (["--config", "CFG", "--node", "n1", "--cluster-id", "x"], "--cluster-id"),
    ],
)
def test_option_combinations(cfg: Path, args: list[str], phrase: str) -> None:
    real = [str(cfg) if a == "CFG" else str(cfg.parent / "d") if a == "D" else a for a in args]
    r = mountd(*real, cfg.parent / "mnt", scope=cfg.parent)
    refused(r, EXIT_USAGE, phrase)


def test_data_dir_of_another_cluster(cfg: Path) -> None:
    data = cfg.parent / "data"
    MetaStore.open(data / "meta", cluster_id="another-cluster").close()
    r = mountd(
        "--config", cfg, "--node", "n1", "--data", data, cfg.parent / "mnt", scope=cfg.parent
    )
    refused(r, EXIT_DATADIR, "belongs to cluster another-cluster")


def test_data_dir_of_another_node(cfg: Path) -> None:
    data = cfg.parent / "data"
    MetaStore.open(data / "meta", cluster_id=load(cfg).id, node_id=NodeId(2)).close()
    r = mountd(
        "--config", cfg, "--node", "n1", "--data", data, cfg.parent / "mnt", scope=cfg.parent
    )
    refused(r, EXIT_DATADIR, str(data), "node id 2", "not of node n1 (id 1)")


def test_port_in_use(cfg: Path) -> None:
    port = load(cfg).node("n1").port
    taken = socket.socket()
    taken.bind(("127.0.0.1", port))
    taken.listen()
    try:
        r = mountd(
            "--config",
            cfg,
            "--node",
            "n1",
            "--data",
            cfg.parent / "d",
            cfg.parent / "mnt",
            scope=cfg.parent,
        )
    finally:
        taken.close()
    refused(r, EXIT_FAILURE, f"cannot listen on 127.0.0.1:{port}", "another process uses this port")
    assert not (cfg.parent / "d" / "control.sock").exists()
