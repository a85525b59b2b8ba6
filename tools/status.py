"""``dfs status``: the whole cluster at a glance — nodes, who reaches whom, volumes, sites.

Asks one of two ways (dfs/cluster/survey.py): through the daemon of a local
mount (``--mount``, ``$DFS_MOUNT``, the only dfs mount here, or ``--data``),
which asks every other node over its own connections; or, with ``--config
FILE``, every node directly over the network with the cluster secret (from any
machine that holds the configuration and its secret). The picture is put
together by dfs/cluster/clusterview.py; this module only prints it, plain in
pipes and coloured on a terminal, or as JSON; ``--watch`` redraws it.

Exit codes: 0 healthy, 1 degraded (a problem is listed), 2 bad usage or
nobody to ask (no daemon behind the mount, no node answered).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import trio
from rich.text import Text

from dfs.cluster.clusterview import (
    BEHIND,
    DIVERGED,
    HEALING,
    HEALTH_OK,
    IN_SYNC,
    NO_PRIMARY,
    PRIMARY,
    UNREACHABLE,
    cluster_view,
)
from dfs.cluster.control import ControlError, request, socket_path
from dfs.cluster.survey import ask_cluster
from dfs.config import ConfigError, load
from dfs.net.rpc import RemoteError

from .output import Cell, is_terminal, render, table
from .paths import TreePathError, choose_mount
from .volume import data_dir_of

EXIT_OK = 0
EXIT_DEGRADED = 1
EXIT_USAGE = 2
ASK_TIMEOUT = 15.0  # the daemon asks each node within a probe timeout (at most timeouts.call)

_GOOD = "green"
_WARN = "yellow"
_BAD = "bold red"
_STATE_STYLE = {
    PRIMARY: _GOOD,
    IN_SYNC: _GOOD,
    BEHIND: _WARN,
    HEALING: _WARN,
    NO_PRIMARY: _WARN,
    DIVERGED: _BAD,
    UNREACHABLE: _BAD,
}


class Unavailable(Exception):
    """Nobody could be asked; the message says why."""


# --- asking ----------------------------------------------------------------------------------


def _control(mount: str | None, data: Path | None) -> Path:
    if data is None:
        try:
            where = choose_mount(mount, os.environ)
        except TreePathError as exc:
            raise click.UsageError(
                f"{exc.message}; or give --config FILE to ask the nodes over the network"
            ) from None
        data = data_dir_of(where)
        if data is None:
            raise click.UsageError(
                f"cannot tell which daemon serves {where}: give its data directory with --data"
            )
    return socket_path(data)


@contextmanager
def _quiet() -> Iterator[None]:
    """Connection failures are what status reports: not log lines on stderr too."""
    net = logging.getLogger("dfs.net")
    level = net.level
    net.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        net.setLevel(level)


def ask(sock: Path | None, config: Path | None) -> tuple[list[dict[str, Any]], str | None]:
    """The reports of every node, and the node that gathered them (None: this machine)."""
    if config is not None:
        try:
            cfg = load(config)
            secret = cfg.read_secret()
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from None
        with _quiet():
            reports = trio.run(ask_cluster, cfg, secret)
        if not any("status" in r for r in reports):
            raise Unavailable(f"no node of {config} answered")
        return reports, None
    assert sock is not None
    if not sock.exists():
        raise Unavailable(f"no daemon runs there (no {sock}); try --config FILE")
    try:
        got = request(sock, "cluster.status", {}, timeout=ASK_TIMEOUT)
    except (ControlError, RemoteError) as exc:
        raise Unavailable(f"{exc}; try --config FILE") from None
    return list(got["nodes"]), str(got["asked"])


# --- printing --------------------------------------------------------------------------------


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _n(x: object) -> str:
    return str(x) if isinstance(x, int) and not isinstance(x, bool) else "-"


def peers_text(peers: Sequence[Mapping[str, Any]]) -> str:
    """``n2 ok, n3 UNREACHABLE (timeout)``: who a node reaches, as its heartbeat saw it."""
    parts = []
    for p in peers:
        if p.get("state") == "reachable":
            parts.append(f"{p.get('name')} ok")
        else:
            parts.append(f"{p.get('name')} UNREACHABLE ({p.get('error_kind') or p.get('state')})")
    return ", ".join(parts) or "-"


def _peers_cell(n: Mapping[str, Any]) -> Cell:
    if not n["reached"]:
        return "-"
    text = peers_text(n["peers"])
    return Text(text, style=_WARN) if n["unreachable"] else Text(text)


def nodes_table_rows(view: Mapping[str, Any]) -> list[list[Cell]]:
    rows: list[list[Cell]] = []
    for n in view["nodes"]:
        if not n["reached"]:
            kind = n.get("error_kind")
            why = f" ({kind})" if kind and kind != "unreachable" else ""
            state = Text(f"UNREACHABLE{why}", style=_BAD)
            rows.append([n["name"], state, *["-"] * 8])
            continue
        files = n.get("open_files") or {}
        opened = sum(v for v in files.values() if isinstance(v, int))
        failures, repairs = n.get("checksum_failures"), n.get("read_repairs")
        bad = isinstance(failures, int) and isinstance(repairs, int) and failures > repairs
        rows.append(
            [
                n["name"],
                Text("up", style=_GOOD),
                n.get("address") or "-",
                _duration(n.get("uptime")),
                _peers_cell(n),
                _n(opened) if files else "-",
                Text(_n(failures), style=_BAD if bad else ""),
                _n(repairs),
                _n(n.get("elections")),
                _n(n.get("rollbacks")),
            ]
        )
    return rows


NODE_HEADERS = (
    "NODE",
    "STATE",
    "ADDRESS",
    "UPTIME",
    "PEERS",
    "OPEN",
    "CKSUM FAIL",
    "REPAIRED",
    "ELECTIONS",
    "ROLLBACKS",
)
VOLUME_HEADERS = (
    "VOLUME",
    "PATH",
    "PRIMARY",
    "EPOCH",
    "SITE",
    "STATE",
    "APPLIED",
    "LAG",
    "LEASE",
    "LAST CHECK",
)


def _site_state(s: Mapping[str, Any]) -> Cell:
    state = str(s["state"])
    text = state
    heal = s.get("heal")
    if state == HEALING and isinstance(heal, Mapping):
        done, total = heal.get("done"), heal.get("total")
        if isinstance(done, int) and isinstance(total, int) and total > 0:
            text = f"healing {100 * done // total}% ({done}/{total})"
            eta = heal.get("eta")
            if isinstance(eta, int | float):
                text += f" eta {_duration(eta)}"
    elif state == BEHIND and s.get("lag"):
        text = f"behind -{s['lag']}"
    return Text(text, style=_STATE_STYLE.get(state, ""))


def _lease(s: Mapping[str, Any]) -> str:
    if s["state"] == PRIMARY:
        return "-"
    left = s.get("lease_left")
    if isinstance(left, int | float) and not isinstance(left, bool):
        return f"{left:.1f}s" if left > 0 else "none"
    if s.get("lease") is True:
        return "held"
    if s.get("lease") is False:
        return "lapsed"
    return "-"


def _check(c: Mapping[str, Any] | None) -> str:
    if c is None:
        return "never"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(c["time"])))
    return f"{when} {c.get('result', '?')}"


def volume_table_rows(view: Mapping[str, Any]) -> list[list[Cell]]:
    rows: list[list[Cell]] = []
    for v in view["volumes"]:
        primary: Cell = v["primary"] if v["primary_reached"] else Text(v["primary"], style=_BAD)
        first = True
        for s in v["sites"] or [{"node": "-", "state": "-"}]:
            head: list[Cell] = (
                [str(v["vol"]), v["path"], primary, str(v["epoch"])] if first else ["", "", "", ""]
            )
            rows.append(
                [
                    *head,
                    s["node"],
                    _site_state(s),
                    _n(s.get("applied")),
                    _n(s.get("lag")) if s["state"] != PRIMARY else "-",
                    _lease(s),
                    _check(v.get("last_check")) if first else "",
                ]
            )
            first = False
    return rows


def render_view(
    view: Mapping[str, Any], *, colour: bool = False, when: float | None = None
) -> list[str]:
    """``view`` as ``dfs status`` prints it: a header, the problems, the two tables."""
    stamp = time.strftime(
        "%Y-%m-%d %H:%M:%S", time.localtime(when if when is not None else time.time())
    )
    asked = f"asked {view['asked']}" if view.get("asked") else "asked every node from here"
    nodes, vols = len(view["nodes"]), len(view["volumes"])
    lines = [
        f"cluster {view.get('cluster') or '?'}: {nodes} node{'s' * (nodes != 1)}, "
        f"{vols} volume{'s' * (vols != 1)}; {asked} at {stamp}"
    ]
    ok = view["health"] == HEALTH_OK
    health = Text("health: ")
    health.append("OK" if ok else "DEGRADED", style=_GOOD if ok else _BAD)
    lines += render(health, colour=colour)
    for p in view["problems"]:
        lines.append(f"  - {p}")
    lines.append("")
    lines += render(table(NODE_HEADERS, nodes_table_rows(view), right=range(5, 10)), colour=colour)
    lines.append("")
    lines += render(
        table(VOLUME_HEADERS, volume_table_rows(view), right=(0, 3, 6, 7)), colour=colour
    )
    return lines


def exit_code(view: Mapping[str, Any]) -> int:
    return EXIT_OK if view["health"] == HEALTH_OK else EXIT_DEGRADED


# --- the command -----------------------------------------------------------------------------

CLEAR = "\x1b[H\x1b[2J"


@click.command(name="status")
@click.option(
    "--mount",
    default=None,
    help="Ask the daemon of this dfs mount (default: $DFS_MOUNT, else the only one).",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Ask the daemon of this data directory.",
)
@click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Ask every node of this cluster.toml over the network (needs its secret).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (with --watch: one line per refresh)."
)
@click.option("--watch", is_flag=True, help="Refresh every --interval seconds until Ctrl-C.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="With --watch: stop after this many refreshes.",
)
def status(
    mount: str | None,
    data: Path | None,
    config: Path | None,
    as_json: bool,
    watch: bool,
    interval: float,
    count: int | None,
) -> None:
    """Show the whole cluster: every node and who reaches whom, every volume with its
    primary and epoch, each storage site's state, lag and lease, and the counters since
    each node started (checksum failures, read repairs, elections, rollbacks).

    \b
    dfs status                          through the only dfs mount here (or $DFS_MOUNT)
    dfs status --mount /mnt/dfs         through that mount's daemon
    dfs status --config cluster.toml    every node asked over the network, from here
    dfs status --watch                  redraw every 2 s (--interval, --count)

    Exit codes: 0 healthy, 1 degraded (each problem is listed), 2 bad usage or
    nobody to ask.
    """
    if config is not None and (mount is not None or data is not None):
        raise click.UsageError("give --config, or --mount/--data, not both")
    if count is not None and not watch:
        raise click.UsageError("--count goes with --watch")
    sock = None if config is not None else _control(mount, data)
    colour = is_terminal() and not as_json
    rounds = 0
    code = EXIT_OK
    try:
        while True:
            try:
                reports, asked = ask(sock, config)
            except Unavailable as exc:
                click.echo(f"dfs status: {exc}", err=True)
                if not watch:
                    sys.exit(EXIT_USAGE)
                code = EXIT_USAGE
            else:
                view = cluster_view(reports, asked=asked)
                view["time"] = round(time.time(), 3)
                code = exit_code(view)
                view["exit_code"] = code
                if as_json:
                    click.echo(json.dumps(view, indent=None if watch else 2))
                else:
                    out = "\n".join(render_view(view, colour=colour, when=view["time"]))
                    if watch and colour:
                        out = CLEAR + out
                    elif watch and rounds:
                        out = "\n" + out
                    click.echo(out)
            rounds += 1
            if not watch or (count is not None and rounds >= count):
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    sys.exit(code)
