"""Peer reachability: the heartbeat that pings every other node, and the table of what it saw.

``Heartbeat`` runs one task per peer. Each task probes its peer (a ``ping``
call with a deadline of ``probe_timeout``), records the outcome in the
``HealthTable``, then sleeps until its next tick, ``interval`` seconds after
the previous one (ticks missed while a probe was slow are skipped, never
bunched). Probes of one peer never overlap, and a slow peer never delays the
probes of another. All times come from trio's clock, so tests run this on
``trio.testing.MockClock``.

A row of the table says whether the peer answered its last probe
(``reachable``; ``None`` until the first probe ended), when it last answered,
the round-trip time of that answer, and while it is unreachable the error of
the last failed probe and its kind:

- ``auth``: the handshake was refused, either way round (wrong secret, wrong
  cluster, a node that is not the one configured at that address);
- ``unreachable``: no connection (refused, lost, connect deadline);
- ``timeout``: connected, but no answer within the probe's deadline;
- ``error``: the peer answered with an error, or with something that is not a
  pong from that node.

``snapshot()`` is JSON-able (seconds relative to now, not clock readings), for
the ``status`` RPC and the control socket. Replication will consult
``is_reachable``.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from dfs.errors import BUG_MARKER
from dfs.net.rpc import PeerAuthError, PeerTimeout, PeerUnavailable, RemoteError, RpcError

log = logging.getLogger("dfs.cluster.health")


Probe = Callable[[str, float], Awaitable[Mapping[str, Any]]]
"""``await probe(peer_name, timeout)`` -> the peer's pong; raises ``RpcError`` on failure."""

KIND_AUTH = "auth"
KIND_UNREACHABLE = "unreachable"
KIND_TIMEOUT = "timeout"
KIND_ERROR = "error"


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, PeerAuthError):
        return KIND_AUTH
    if isinstance(exc, PeerUnavailable):
        return KIND_UNREACHABLE
    if isinstance(exc, PeerTimeout):
        return KIND_TIMEOUT
    return KIND_ERROR


@dataclass(slots=True)
class PeerHealth:
    """What the heartbeat knows about one peer; times are trio clock readings."""

    name: str
    address: str
    port: int
    reachable: bool | None = None  # None: no probe has ended yet
    since: float = 0.0  # when ``reachable`` last changed (or the table was made)
    last_seen: float | None = None  # when it last answered a probe
    rtt: float | None = None  # seconds, of that answer
    error: str | None = None  # why it is unreachable (None while reachable)
    error_kind: str | None = None
    probes: int = 0
    failures: int = 0  # consecutive failed probes
    pid: int | None = None  # from its last pong
    uptime: float | None = None

    def snapshot(self, now: float) -> dict[str, Any]:
        state = {None: "unknown", True: "reachable", False: "unreachable"}[self.reachable]
        return {
            "name": self.name,
            "address": f"{self.address}:{self.port}",
            "state": state,
            "reachable": self.reachable,
            "for": round(now - self.since, 3),
            "last_seen_ago": None if self.last_seen is None else round(now - self.last_seen, 3),
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "error": self.error,
            "error_kind": self.error_kind,
            "auth_failed": self.reachable is False and self.error_kind == KIND_AUTH,
            "probes": self.probes,
            "failures": self.failures,
            "pid": self.pid,
            "uptime": self.uptime,
        }


class HealthTable:
    """The reachability of every peer, as the heartbeat last saw it."""

    def __init__(self, peers: Iterable[tuple[str, str, int]]) -> None:
        now = trio.current_time()
        self._rows = {name: PeerHealth(name, addr, port, since=now) for name, addr, port in peers}
        self._changed = trio.Event()

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, name: str) -> PeerHealth:
        return self._rows[name]

    def is_reachable(self, name: str) -> bool:
        return self._rows[name].reachable is True

    def record_success(self, name: str, rtt: float, pong: Mapping[str, Any]) -> None:
        row = self._rows[name]
        now = trio.current_time()
        row.probes += 1
        row.failures = 0
        row.last_seen = now
        row.rtt = rtt
        row.error = row.error_kind = None
        pid, uptime = pong.get("pid"), pong.get("uptime")
        row.pid = pid if isinstance(pid, int) and not isinstance(pid, bool) else None
        row.uptime = float(uptime) if isinstance(uptime, int | float) else None
        if row.reachable is not True:
            if row.reachable is False:
                log.info("node %s is reachable again (rtt %.1f ms)", name, rtt * 1000)
            else:
                log.info("node %s is reachable (rtt %.1f ms)", name, rtt * 1000)
            self._set(row, True, now)

    def record_failure(self, name: str, exc: BaseException) -> None:
        row = self._rows[name]
        now = trio.current_time()
        row.probes += 1
        row.failures += 1
        kind = error_kind(exc)
        message = str(exc) or type(exc).__name__
        news = row.reachable is not False or kind != row.error_kind
        row.error = message
        row.error_kind = kind
        if news:  # logged once, not at every probe
            log.warning("node %s is unreachable (%s): %s", name, kind, message)
        if row.reachable is not False:
            self._set(row, False, now)
        elif news:
            self._notify()

    def _set(self, row: PeerHealth, reachable: bool, now: float) -> None:
        row.reachable = reachable
        row.since = now
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Wait until some peer's reachability, or the kind of its failure, changes."""
        await self._changed.wait()

    def snapshot(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        return [row.snapshot(now) for row in self._rows.values()]


class Heartbeat:
    """Probes every peer of ``table`` every ``interval`` seconds; a service for nursery.start."""

    def __init__(
        self, table: HealthTable, probe: Probe, *, interval: float, probe_timeout: float
    ) -> None:
        if interval <= 0 or probe_timeout <= 0:
            raise ValueError("interval and probe_timeout must be positive")
        self.table = table
        self._probe = probe
        self.interval = interval
        self.probe_timeout = probe_timeout

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for name in self.table:
                nursery.start_soon(self._probe_loop, name)
            task_status.started()

    async def _probe_loop(self, name: str) -> None:
        next_at = trio.current_time()
        while True:
            await self.probe_once(name)
            next_at += self.interval
            now = trio.current_time()
            if next_at < now:  # the probe took longer than a tick: skip the missed ones
                next_at += (now - next_at) // self.interval * self.interval + self.interval
            await trio.sleep_until(next_at)

    async def probe_once(self, name: str) -> None:
        """Probe ``name`` now and record the outcome; never raises but Cancelled."""
        start = trio.current_time()
        try:
            pong = await self._probe(name, self.probe_timeout)
            if not isinstance(pong, Mapping) or pong.get("node") != name:
                raise RemoteError(
                    errno.EPROTO, f"node {name}: answered with something that is not its pong"
                )
        except RpcError as exc:
            self.table.record_failure(name, exc)
        except Exception as exc:
            log.exception("%s probing node %s", BUG_MARKER, name)
            self.table.record_failure(name, exc)
        else:
            self.table.record_success(name, trio.current_time() - start, pong)
