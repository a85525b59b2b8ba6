"""Prometheus metrics: what a node's status becomes, FUSE timing at the errno boundary, and
the endpoint served over loopback. Through real mounts: tests/fuse/test_status.py."""

from __future__ import annotations

import errno
import socket
import urllib.request
from typing import Any

import pyfuse3
import pytest
import trio
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dfs.errors import FsError
from dfs.metrics import MetricsServer, NodeMetrics, status_metrics
from mountd.fuse_convert import fuse_errors
from tests.unit.test_clusterview import site_state, status


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def test_a_primary_s_status_as_metrics() -> None:
    st = status(
        "n1",
        role="primary",
        applied=10,
        sites_state=[
            site_state("n2", 10, 10),
            site_state("n3", 4, 10, heal={"done": 2, "total": 8}),
        ],
        cannot=("n3",),
    )
    st["replication"]["read_repairs"] = 2
    st["replication"]["checksum_failures"] = 3
    st["replication"]["elections"] = 1
    reg = NodeMetrics().registry
    reg.register(_Fixed(st))
    got = samples(generate_latest(reg).decode())
    vol = (("path", "/"), ("volume", "1"))
    assert got["dfs_volume_epoch", vol] == 1
    assert got["dfs_volume_applied_sequence", vol] == 10
    assert got["dfs_volume_role", (*vol[:1], ("role", "primary"), vol[1])] == 1
    assert got["dfs_site_lag_updates", (*vol[:1], ("site", "n3"), vol[1])] == 6
    assert got["dfs_site_in_sync", (*vol[:1], ("site", "n2"), vol[1])] == 1
    assert got["dfs_site_in_sync", (*vol[:1], ("site", "n3"), vol[1])] == 0
    assert got["dfs_heal_done", (*vol[:1], ("site", "n3"), vol[1])] == 2
    assert ("dfs_heal_done", (*vol[:1], ("site", "n2"), vol[1])) not in got  # no heal: none
    assert got["dfs_peer_reachable", (("peer", "n2"),)] == 1
    assert got["dfs_peer_reachable", (("peer", "n3"),)] == 0
    assert got["dfs_read_repairs_total", ()] == 2
    assert got["dfs_checksum_failures_total", ()] == 3
    assert got["dfs_elections_total", ()] == 1
    assert got["dfs_open_files", (("where", "local"),)] == 2
    assert got["dfs_uptime_seconds", ()] == 3723
    assert got["dfs_rpc_requests_total", ()] == 5
    assert any(name == "process_open_fds" for name, _ in got)  # the process collector


def test_a_site_s_lease_and_a_status_without_sections() -> None:
    fams = {f.name: f for f in status_metrics(status("n2"))}
    (lease,) = fams["dfs_volume_read_lease"].samples
    assert lease.value == 1
    assert list(status_metrics({})) != []  # empty families, no error


class _Fixed:
    def __init__(self, st: dict[str, Any]) -> None:
        self.st = st

    def collect(self) -> Any:
        return list(status_metrics(self.st))


class _Handlers:
    def __init__(self, metrics: NodeMetrics | None) -> None:
        self.fuse_metrics = metrics.fuse if metrics is not None else None

    @fuse_errors
    async def lookup(self, fail: int) -> str:
        if fail:
            raise FsError(fail)
        return "ok"


def test_fuse_requests_are_timed_and_their_errors_counted_by_operation() -> None:
    m = NodeMetrics()
    h = _Handlers(m)

    async def main() -> None:
        assert await h.lookup(0) == "ok"
        with pytest.raises(pyfuse3.FUSEError):
            await h.lookup(errno.ENOENT)
        assert await _Handlers(None).lookup(0) == "ok"  # metrics off: nothing measured

    trio.run(main)
    got = samples(generate_latest(m.registry).decode())
    assert got["dfs_fuse_request_duration_seconds_count", (("op", "lookup"),)] == 2
    assert got["dfs_fuse_errors_total", (("errno", "ENOENT"), ("op", "lookup"))] == 1


def test_replication_metrics_count_updates_and_latencies() -> None:
    m = NodeMetrics()
    vm = m.replication.for_volume(3)
    vm.updated()
    vm.acknowledged(0.002)
    vm.site_applied("n2", 0.001)
    got = samples(generate_latest(m.registry).decode())
    assert got["dfs_updates_total", (("volume", "3"),)] == 1
    assert got["dfs_replication_ack_seconds_count", (("volume", "3"),)] == 1
    assert got["dfs_replication_site_seconds_count", (("site", "n2"), ("volume", "3"))] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_the_endpoint_serves_the_status_of_the_moment_over_loopback() -> None:
    async def main() -> None:
        m = NodeMetrics()
        st = status("n2")
        m.watch_status(lambda: st)  # read on this trio loop at each scrape
        server = await MetricsServer.start(m, "127.0.0.1", _free_port())
        url = f"http://127.0.0.1:{server.port}/metrics"

        def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            with urllib.request.urlopen(url, timeout=10) as r:
                return samples(r.read().decode())

        try:
            got = await trio.to_thread.run_sync(scrape)
            assert got["dfs_volume_applied_sequence", (("path", "/"), ("volume", "1"))] == 10
            st["replication"]["volumes"][0]["applied"] = 11
            got = await trio.to_thread.run_sync(scrape)
            assert got["dfs_volume_applied_sequence", (("path", "/"), ("volume", "1"))] == 11
            with pytest.raises(OSError):  # the port is taken now
                await MetricsServer.start(NodeMetrics(), "127.0.0.1", server.port)
        finally:
            await server.stop()
        with pytest.raises(OSError):
            await trio.to_thread.run_sync(scrape)

    trio.run(main)
