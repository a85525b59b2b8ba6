"""A node's Prometheus metrics: what it measures as it works, and what its status says.

``NodeMetrics`` owns one ``prometheus_client`` registry per node (no module
state). Two kinds of metric go into it:

- **measured** on the way, by the code that does the work, only when metrics
  are on (otherwise that code holds ``None`` and measures nothing): FUSE
  requests and their latency by operation (``FuseMetrics``, from mountd's
  errno boundary), updates a primary ordered, and replication latency
  (``ReplicationMetrics``, from ``Replicator``);
- **read from the node's status** at each scrape (``watch_status``): peers,
  volumes, sites and their lag, counters of checksum failures, read repairs,
  elections and rollbacks, open files. They are the same numbers ``dfs status``
  shows, so the two never disagree. The scrape runs in the HTTP server's
  thread; the status is taken on the trio loop (``trio.from_thread.run_sync``),
  where it is owned.

``MetricsServer`` serves the registry over HTTP (``prometheus_client``'s WSGI
server, in threads of its own: nothing of it runs on the event loop). Every
metric is listed in docs/OPERATIONS.md, "Metrics".
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.registry import Collector

log = logging.getLogger("dfs.metrics")

NS = "dfs"
# FUSE requests take from tens of microseconds (a cached getattr) to seconds (a forwarded
# update waiting for a majority); the default buckets start at 5 ms.
FUSE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
REPLICATION_BUCKETS = FUSE_BUCKETS[2:]

Status = Callable[[], Mapping[str, Any]]


class FuseMetrics:
    """FUSE requests by operation: how many, how long, which errors."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._seconds = Histogram(
            "fuse_request_duration_seconds",
            "FUSE requests served by this node's mount, by operation: count and latency.",
            ["op"],
            namespace=NS,
            registry=registry,
            buckets=FUSE_BUCKETS,
        )
        self._errors = Counter(
            "fuse_errors",
            "FUSE requests answered with an error, by operation and errno.",
            ["op", "errno"],
            namespace=NS,
            registry=registry,
        )
        self._by_op: dict[str, Any] = {}

    def observe(self, op: str, seconds: float) -> None:
        child = self._by_op.get(op)
        if child is None:
            child = self._by_op[op] = self._seconds.labels(op)
        child.observe(seconds)

    def failed(self, op: str, err: int) -> None:
        self._errors.labels(op, errno.errorcode.get(err, str(err))).inc()


class ReplicationMetrics:
    """What a primary measures while it replicates (``Replicator``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._updates = Counter(
            "updates",
            "Updates (journal records) this node ordered as the primary, by volume.",
            ["volume"],
            namespace=NS,
            registry=registry,
        )
        self._acked = Histogram(
            "replication_ack_seconds",
            "From an update's commit on the primary until a majority of the volume's sites "
            "applied it, by volume.",
            ["volume"],
            namespace=NS,
            registry=registry,
            buckets=REPLICATION_BUCKETS,
        )
        self._site = Histogram(
            "replication_site_seconds",
            "From sending records to a site in sync until it answered that it applied them, "
            "by volume and site.",
            ["volume", "site"],
            namespace=NS,
            registry=registry,
            buckets=REPLICATION_BUCKETS,
        )

    def for_volume(self, vol: int) -> VolumeReplicationMetrics:
        return VolumeReplicationMetrics(self, str(vol))


class VolumeReplicationMetrics:
    """``ReplicationMetrics`` of one volume: what one ``Replicator`` is given."""

    def __init__(self, parent: ReplicationMetrics, vol: str) -> None:
        self._updates = parent._updates.labels(vol)
        self._acked = parent._acked.labels(vol)
        self._site_hist = parent._site
        self._vol = vol
        self._sites: dict[str, Any] = {}

    def updated(self) -> None:
        self._updates.inc()

    def acknowledged(self, seconds: float) -> None:
        self._acked.observe(seconds)

    def site_applied(self, site: str, seconds: float) -> None:
        child = self._sites.get(site)
        if child is None:
            child = self._sites[site] = self._site_hist.labels(self._vol, site)
        child.observe(seconds)


class NodeMetrics:
    """One node's registry and the metrics measured into it (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.fuse = FuseMetrics(self.registry)
        self.replication = ReplicationMetrics(self.registry)
        self._status: _StatusCollector | None = None

    def watch_status(self, status: Status) -> None:
        """Publish what ``status()`` says at every scrape (call it in the trio run that owns
        what ``status`` reads: the scrape asks that run)."""
        if self._status is not None:
            raise ValueError("a status is already watched")
        self._status = _StatusCollector(status, trio.lowlevel.current_trio_token())
        self.registry.register(self._status)


class _StatusCollector(Collector):
    def __init__(self, status: Status, token: trio.lowlevel.TrioToken) -> None:
        self._read = status
        self._token = token

    def collect(self) -> Iterable[Metric]:
        try:
            status = trio.from_thread.run_sync(self._read, trio_token=self._token)
        except trio.RunFinishedError:  # the daemon is stopping
            return []
        return list(status_metrics(status))


# --- the status, as metrics ------------------------------------------------------------------


def _num(x: object) -> float | None:
    if isinstance(x, bool):
        return float(x)
    return float(x) if isinstance(x, int | float) else None


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NS}_{name}", doc, labels=labels)


def status_metrics(status: Mapping[str, Any]) -> Iterator[Metric]:
    """The metric families that a node's ``status`` (dfs/cluster/node.py) stands for."""
    uptime = _num(status.get("uptime"))
    if uptime is not None:
        g = _gauge("uptime_seconds", "Seconds since this node's daemon started.", [])
        g.add_metric([], uptime)
        yield g
    yield from _peer_metrics(status.get("peers") or [])
    rpc = status.get("rpc") or {}
    for key, name, doc in (
        ("requests_served", "rpc_requests", "RPC requests from other nodes this node answered."),
        ("auth_failures", "rpc_auth_failures", "Connections refused: the secret was not proven."),
        ("protocol_errors", "rpc_protocol_errors", "Connections closed for a malformed frame."),
        ("handler_errors", "rpc_handler_errors", "RPC handlers that failed with a bug (EIO)."),
    ):
        v = _num(rpc.get(key))
        if v is not None:
            c = CounterMetricFamily(f"{NS}_{name}", doc)
            c.add_metric([], v)
            yield c
    repl = status.get("replication") or {}
    for key, doc in (
        ("checksum_failures", "Blocks of this node's replica that failed their checksum."),
        ("read_repairs", "Of those, blocks rewritten from another replica (read repair)."),
        ("elections", "Elections this node stood in (failover)."),
        ("rollbacks", "Rollbacks of updates an old primary made without a majority."),
    ):
        v = _num(repl.get(key))
        if v is not None:
            c = CounterMetricFamily(f"{NS}_{key}", doc)
            c.add_metric([], v)
            yield c
    yield from _volume_metrics(repl.get("volumes") or [])
    files = status.get("files") or {}
    if files:
        g = _gauge(
            "open_files",
            "Open file handles on this node: 'local' on files it stores (its own kernel's, "
            "and those it holds for other nodes' writes as a primary), 'remote' on files "
            "of volumes it reads from their primary.",
            ["where"],
        )
        for where in ("local", "remote"):
            v = _num(files.get(where))
            if v is not None:
                g.add_metric([where], v)
        yield g


def _peer_metrics(peers: list[Any]) -> Iterator[Metric]:
    up = _gauge(
        "peer_reachable",
        "Whether this node's heartbeat reached the peer at its last probe (1) or not (0).",
        ["peer"],
    )
    rtt = _gauge("peer_rtt_seconds", "Round-trip time of the peer's last answered probe.", ["peer"])
    for p in peers:
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            continue
        up.add_metric([p["name"]], 1.0 if p.get("reachable") is True else 0.0)
        ms = _num(p.get("rtt_ms"))
        if ms is not None:
            rtt.add_metric([p["name"]], ms / 1000)
    yield up
    yield rtt


def _volume_metrics(volumes: list[Any]) -> Iterator[Metric]:
    labels = ["volume", "path"]
    role = _gauge(
        "volume_role",
        "This node's role in the volume (1 for the role it has).",
        [
            *labels,
            "role",
        ],
    )
    epoch = _gauge(
        "volume_epoch", "The volume's epoch (term of its primary) as this node follows it.", labels
    )
    seq = _gauge("volume_applied_sequence", "The last update of the volume applied here.", labels)
    lease = _gauge("volume_read_lease", "A site's read lease: 1 held, 0 lapsed.", labels)
    site_labels = [*labels, "site"]
    lag = _gauge(
        "site_lag_updates", "As the primary sees it: updates a site has not applied.", site_labels
    )
    in_sync = _gauge("site_in_sync", "As the primary sees it: 1 if a site is in sync.", site_labels)
    diverged = _gauge(
        "site_diverged", "1 if a site holds updates the primary does not have.", site_labels
    )
    site_lease = _gauge(
        "site_lease_seconds", "Read lease the primary granted a site, left.", site_labels
    )
    heal_done = _gauge("heal_done", "A site's heal in progress: items done.", site_labels)
    heal_total = _gauge("heal_total", "A site's heal in progress: items in all.", site_labels)
    for v in volumes:
        if not isinstance(v, dict) or not isinstance(v.get("vol"), int):
            continue
        key = [str(v["vol"]), str(v.get("path", ""))]
        role.add_metric([*key, str(v.get("role", "none"))], 1.0)
        for family, field in ((epoch, "epoch"), (seq, "applied")):
            x = _num(v.get(field))
            if x is not None:
                family.add_metric(key, x)
        if "lease" in v:
            lease.add_metric(key, 1.0 if v.get("lease") else 0.0)
        for st in v.get("sites_state") or []:
            if not isinstance(st, dict) or not isinstance(st.get("site"), str):
                continue
            sk = [*key, st["site"]]
            for family, field in ((lag, "lag"), (site_lease, "lease")):
                x = _num(st.get(field))
                if x is not None:
                    family.add_metric(sk, x)
            in_sync.add_metric(sk, 1.0 if st.get("in_sync") else 0.0)
            diverged.add_metric(sk, 1.0 if st.get("diverged") else 0.0)
            heal = st.get("heal")  # dfs heal's progress, once it exists
            if isinstance(heal, dict):
                for family, field in ((heal_done, "done"), (heal_total, "total")):
                    x = _num(heal.get(field))
                    if x is not None:
                        family.add_metric(sk, x)
    yield from (role, epoch, seq, lease, lag, in_sync, diverged, site_lease, heal_done, heal_total)


# --- serving ---------------------------------------------------------------------------------


class MetricsServer:
    """``NodeMetrics`` served at ``http://ADDRESS:PORT/metrics`` until ``stop``."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.port: int = httpd.server_address[1]

    @classmethod
    async def start(cls, metrics: NodeMetrics, address: str, port: int) -> MetricsServer:
        """Bind and serve (``OSError`` if the address cannot be bound)."""

        def bind() -> tuple[WSGIServer, threading.Thread]:
            return start_http_server(port, addr=address, registry=metrics.registry)

        httpd, thread = await trio.to_thread.run_sync(bind)
        log.info("metrics at http://%s:%d/metrics", address, httpd.server_address[1])
        return cls(httpd, thread)

    async def stop(self) -> None:
        def shut() -> None:
            self._httpd.shutdown()  # returns once serve_forever has
            self._httpd.server_close()
            self._thread.join()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(shut)
