"""The heartbeat and its reachability table, on trio's MockClock with scripted peers."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest
import trio
import trio.testing

from dfs.cluster.health import HealthTable, Heartbeat
from dfs.net.rpc import PeerAuthError, PeerTimeout, PeerUnavailable, RemoteError

PEERS = [("n2", "127.0.0.1", 7802), ("n3", "127.0.0.1", 7803)]


def mock_clock_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        clock = trio.testing.MockClock(autojump_threshold=0)
        trio.run(functools.partial(fn, *args, **kwargs), clock=clock)

    return wrapper


class ScriptedPeers:
    """A probe whose answer per peer is set by the test: "ok", "down", "auth", "hang", "slow",
    "garbage" or "bug"; it records when each probe started (trio time)."""

    def __init__(self) -> None:
        self.mode: dict[str, str] = {"n2": "ok", "n3": "ok"}
        self.started: dict[str, list[float]] = {"n2": [], "n3": []}

    async def probe(self, name: str, timeout: float) -> Mapping[str, Any]:  # noqa: ASYNC109
        self.started[name].append(trio.current_time())
        mode = self.mode[name]
        if mode == "down":
            raise PeerUnavailable(f"node {name}: connection refused")
        if mode == "auth":
            raise PeerAuthError(f"node {name}: authentication failed: peer refused")
        if mode == "hang":
            await trio.sleep(timeout)
            raise PeerTimeout(f"node {name}: ping got no answer within {timeout:g}s")
        if mode == "slow":
            await trio.sleep(timeout * 0.9)
        if mode == "garbage":
            return {"node": "someone-else"}
        if mode == "bug":
            raise RuntimeError("a bug in the probe")
        await trio.sleep(0.001)
        return {"node": name, "pid": 42, "uptime": 1.5}


@mock_clock_test
async def test_every_peer_is_probed_each_interval_and_found_reachable() -> None:
    peers = ScriptedPeers()
    table = HealthTable(PEERS)
    assert [r["state"] for r in table.snapshot()] == ["unknown", "unknown"]
    hb = Heartbeat(table, peers.probe, interval=1.0, probe_timeout=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(hb.run)
        await trio.sleep(10.5)
        snap = {r["name"]: r for r in table.snapshot()}
        for name in ("n2", "n3"):
            assert snap[name]["state"] == "reachable" and snap[name]["reachable"] is True
            assert snap[name]["error"] is None and not snap[name]["auth_failed"]
            assert snap[name]["rtt_ms"] == pytest.approx(1.0)
            assert snap[name]["last_seen_ago"] < 1.0
            assert snap[name]["pid"] == 42 and snap[name]["uptime"] == 1.5
            assert len(peers.started[name]) == 11  # t = 0, 1, ..., 10
            starts = peers.started[name]
            gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
            assert all(g == pytest.approx(1.0) for g in gaps)
        assert table.is_reachable("n2") and table.is_reachable("n3")
        nursery.cancel_scope.cancel()


@mock_clock_test
async def test_a_peer_going_down_and_coming_back() -> None:
    peers = ScriptedPeers()
    table = HealthTable(PEERS)
    hb = Heartbeat(table, peers.probe, interval=1.0, probe_timeout=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(hb.run)
        await trio.sleep(2.5)
        peers.mode["n2"] = "down"
        went_down = trio.current_time()
        with trio.fail_after(1.01):  # at the next heartbeat
            while table.is_reachable("n2"):
                await table.wait_changed()
        assert trio.current_time() - went_down <= 1.0
        row = table["n2"]
        assert row.reachable is False and row.error_kind == "unreachable"
        assert row.error is not None and "refused" in row.error
        await trio.sleep(3.5)  # failed probes at +0, +1, +2, +3
        assert table["n2"].failures == 4
        snap = {r["name"]: r for r in table.snapshot()}
        assert snap["n2"]["state"] == "unreachable" and snap["n2"]["for"] >= 3
        assert snap["n2"]["last_seen_ago"] >= 3
        assert snap["n3"]["state"] == "reachable"  # the other peer is not affected
        peers.mode["n2"] = "ok"
        await trio.sleep(1.0)
        assert table.is_reachable("n2") and table["n2"].failures == 0
        assert table["n2"].error is None and table["n2"].error_kind is None
        nursery.cancel_scope.cancel()


@mock_clock_test
async def test_auth_failure_is_reported_as_such() -> None:
    peers = ScriptedPeers()
    peers.mode["n3"] = "auth"
    table = HealthTable(PEERS)
    hb = Heartbeat(table, peers.probe, interval=1.0, probe_timeout=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(hb.run)
        await trio.sleep(3.5)
        snap = {r["name"]: r for r in table.snapshot()}
        assert snap["n3"]["state"] == "unreachable"
        assert snap["n3"]["error_kind"] == "auth" and snap["n3"]["auth_failed"] is True
        assert "authentication failed" in snap["n3"]["error"]
        assert snap["n2"]["state"] == "reachable" and not snap["n2"]["auth_failed"]
        nursery.cancel_scope.cancel()


@mock_clock_test
async def test_a_hanging_peer_times_out_without_delaying_the_others() -> None:
    peers = ScriptedPeers()
    peers.mode["n2"] = "hang"
    table = HealthTable(PEERS)
    hb = Heartbeat(table, peers.probe, interval=1.0, probe_timeout=2.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(hb.run)
        await trio.sleep(2.0)
        assert table["n2"].reachable is None  # its first probe is still waiting
        assert table.is_reachable("n3")
        await trio.sleep(1.0)
        assert table["n2"].reachable is False and table["n2"].error_kind == "timeout"
        await trio.sleep(7.1)
        # n3 kept its pace; n2's probes never overlap: one per 3 s (2.5 s probe, missed ticks
        # skipped, the next on the interval grid).
        assert len(peers.started["n3"]) == 11
        assert peers.started["n2"] == [0.0, 3.0, 6.0, 9.0]
        nursery.cancel_scope.cancel()


@mock_clock_test
async def test_a_slow_but_answering_peer_keeps_to_the_grid() -> None:
    peers = ScriptedPeers()
    peers.mode["n2"] = "slow"  # 0.9 * probe_timeout = 1.8 s per answer
    table = HealthTable(PEERS)
    hb = Heartbeat(table, peers.probe, interval=1.0, probe_timeout=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(hb.run)
        await trio.sleep(6.5)
        assert table.is_reachable("n2")
        assert table["n2"].rtt == pytest.approx(1.8, abs=0.01)
        assert peers.started["n2"] == [0.0, 2.0, 4.0, 6.0]
        nursery.cancel_scope.cancel()


@mock_clock_test
async def test_a_wrong_answer_or_a_bug_in_the_probe_is_a_failure_not_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    peers = ScriptedPeers()
    peers.mode["n2"] = "garbage"
    peers.mode["n3"] = "bug"
    table = HealthTable(PEERS)
    hb = Heartbeat(table, peers.probe, interval=1.0, probe_timeout=2.0)
    with caplog.at_level(logging.INFO, logger="dfs.cluster.health"):
        async with trio.open_nursery() as nursery:
            await nursery.start(hb.run)
            await trio.sleep(2.5)
            assert table["n2"].reachable is False and table["n2"].error_kind == "error"
            assert "not its pong" in (table["n2"].error or "")
            assert table["n3"].reachable is False and table["n3"].error_kind == "error"
            assert len(peers.started["n3"]) == 3  # it kept probing
            nursery.cancel_scope.cancel()
    bugs = [r for r in caplog.records if "UNEXPECTED EXCEPTION" in r.getMessage()]
    assert len(bugs) == 3 and bugs[0].exc_info is not None


@mock_clock_test
async def test_changes_are_logged_once_not_every_probe(caplog: pytest.LogCaptureFixture) -> None:
    peers = ScriptedPeers()
    table = HealthTable(PEERS[:1])
    hb = Heartbeat(table, peers.probe, interval=1.0, probe_timeout=2.0)
    with caplog.at_level(logging.INFO, logger="dfs.cluster.health"):
        async with trio.open_nursery() as nursery:
            await nursery.start(hb.run)
            await trio.sleep(3.5)
            peers.mode["n2"] = "down"
            await trio.sleep(5)
            peers.mode["n2"] = "auth"  # a new kind of failure is news
            await trio.sleep(5)
            peers.mode["n2"] = "ok"
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if r.name == "dfs.cluster.health"]
    assert len(lines) == 4, lines
    assert "n2 is reachable (" in lines[0]
    assert "unreachable (unreachable)" in lines[1]
    assert "unreachable (auth)" in lines[2]
    assert "reachable again" in lines[3]


def test_invalid_intervals_are_refused() -> None:
    async def main() -> None:
        table = HealthTable(PEERS)
        with pytest.raises(ValueError):
            Heartbeat(table, ScriptedPeers().probe, interval=0, probe_timeout=1)

    trio.run(main)


def test_remote_error_pong_kind() -> None:
    async def main() -> None:
        table = HealthTable(PEERS)
        table.record_failure("n2", RemoteError(5, "boom", "n2"))
        assert table["n2"].error_kind == "error" and table["n2"].reachable is False

    trio.run(main)
