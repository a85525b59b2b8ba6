"""The cluster's picture, put together from every node's status: what ``dfs status`` prints.

``cluster_view(reports, asked=...)`` takes the reports of ``dfs.cluster.survey``
(each node's ``status``, or why it did not answer) and returns one JSON-able
dict — the ``--json`` output of ``dfs status``:

- ``nodes``: each node, whether it answered (``reached``; else ``error`` and
  ``error_kind``), its identity and uptime, the peers its heartbeat reaches and
  does not (``peers``: who reaches whom), its open files and its counters since
  start (``checksum_failures``, ``read_repairs``, ``elections``, ``rollbacks``);
- ``volumes``: each volume with its primary and epoch — the newest epoch any
  node follows, and its primary — and each storage site's state as that
  primary sees it (``in sync``, ``behind``, ``diverged``, ``unreachable``;
  ``healing`` once dfs heal reports progress), the sequence it applied, its lag
  and its read lease; ``claims`` lists nodes that act as primary in an older
  epoch (an old primary cut off by a partition);
- ``problems``: one sentence per thing an admin should look at, and ``health``:
  ``ok`` when there is none, else ``degraded``.

Hooks for what is not built yet, shown as absent until it is (empty-safe):

- a volume's last cross-replica check: a ``check`` entry in a node's status of
  the volume (``replication.volumes[i].check``: ``{"time": UNIX seconds,
  "result": str, ...}``); the newest one any node reports is ``last_check``
  (None: "never checked");
- heal progress: a ``heal`` entry in the primary's view of a site
  (``sites_state[i].heal``: ``{"done": int, "total": int, "eta": seconds}``)
  makes that site ``healing``.

Nothing here does I/O; tools/status.py prints it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

HEALTH_OK = "ok"
HEALTH_DEGRADED = "degraded"

# A site's state, as ``dfs status`` and ``dfs volume list`` name it.
PRIMARY = "primary"
IN_SYNC = "in sync"
BEHIND = "behind"
DIVERGED = "diverged"
UNREACHABLE = "unreachable"
HEALING = "healing"
NO_PRIMARY = "primary not reached"

COUNTERS = ("checksum_failures", "read_repairs", "elections", "rollbacks")


def site_mark(st: Mapping[str, Any]) -> str:
    """A site as its primary sees it (an entry of ``sites_state``): ``in sync``, ``behind``,
    ``diverged`` or ``healing``."""
    if st.get("diverged"):
        return DIVERGED
    if isinstance(st.get("heal"), Mapping):
        return HEALING
    return IN_SYNC if st.get("in_sync") else BEHIND


def _int(x: object) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _volumes_of(status: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    repl = status.get("replication")
    vols = repl.get("volumes") if isinstance(repl, Mapping) else None
    return [v for v in vols or [] if isinstance(v, Mapping) and _int(v.get("vol")) is not None]


def cluster_view(reports: Sequence[Mapping[str, Any]], *, asked: str | None) -> dict[str, Any]:
    """See the module docstring; ``asked``: the node the reports came through (None: this
    machine asked every node itself)."""
    reached: dict[str, Mapping[str, Any]] = {
        str(r["node"]): r["status"] for r in reports if isinstance(r.get("status"), Mapping)
    }
    names = [str(r["node"]) for r in reports]
    problems: list[str] = []
    nodes = [_node(r, reached) for r in reports]
    problems += _reachability_problems(nodes, asked)
    volumes = _volumes(reached, names)
    for v in volumes:
        problems += v.pop("_problems")
    for n in nodes:
        lost = (n.get("checksum_failures") or 0) - (n.get("read_repairs") or 0)
        if lost > 0:
            problems.append(
                f"node {n['name']}: {lost} block(s) failed their checksum and were not "
                "repaired from another replica since it started (reads got EIO)"
            )
    any_status = next(iter(reached.values()), {})
    return {
        "cluster": any_status.get("cluster"),
        "cluster_id": any_status.get("cluster_id"),
        "asked": asked,
        "health": HEALTH_DEGRADED if problems else HEALTH_OK,
        "problems": problems,
        "nodes": nodes,
        "volumes": volumes,
        "totals": {k: sum(n[k] for n in nodes if isinstance(n.get(k), int)) for k in COUNTERS},
    }


def _node(report: Mapping[str, Any], reached: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    name = str(report["node"])
    st = reached.get(name)
    if st is None:
        return {
            "name": name,
            "reached": False,
            "error": report.get("error"),
            "error_kind": report.get("error_kind"),
        }
    repl = st.get("replication") if isinstance(st.get("replication"), Mapping) else {}
    assert isinstance(repl, Mapping)
    peers = [
        {
            "name": p.get("name"),
            "state": p.get("state"),
            "error_kind": p.get("error_kind"),
            "rtt_ms": p.get("rtt_ms"),
        }
        for p in st.get("peers") or []
        if isinstance(p, Mapping)
    ]
    files = st.get("files")
    return {
        "name": name,
        "reached": True,
        "address": st.get("address"),
        "pid": st.get("pid"),
        "uptime": st.get("uptime"),
        "mount": st.get("mount"),
        "metrics": st.get("metrics"),
        "peers": peers,
        "unreachable": [p["name"] for p in peers if p["state"] != "reachable"],
        "open_files": dict(files) if isinstance(files, Mapping) else None,
        **{k: _int(repl.get(k)) for k in COUNTERS},
    }


def _reachability_problems(nodes: list[dict[str, Any]], asked: str | None) -> list[str]:
    """One sentence per node that some node, or the asker, cannot reach."""
    out = []
    whence = f"from {asked}" if asked is not None else "from here"
    for n in nodes:
        name = n["name"]
        kinds: dict[str, list[str]] = {}  # why -> the nodes whose heartbeat misses ``name``
        for m in nodes:
            if not m["reached"] or (m["name"] == asked and not n["reached"]):
                continue
            for p in m["peers"]:
                if p["name"] == name and p["state"] != "reachable":
                    kinds.setdefault(str(p.get("error_kind") or p.get("state")), []).append(
                        m["name"]
                    )
        either = " either" if not n["reached"] else ""
        missed = "; ".join(
            f"{', '.join(who)} cannot reach it{either} ({k})" for k, who in kinds.items()
        )
        if not n["reached"]:
            why = n.get("error_kind") or "no answer"
            out.append(
                f"node {name}: not reached {whence} ({why})" + (f"; {missed}" if missed else "")
            )
        elif missed:
            out.append(f"node {name}: {missed}")
    return out


def _volumes(
    reached: Mapping[str, Mapping[str, Any]], names: Sequence[str]
) -> list[dict[str, Any]]:
    by_vol: dict[int, dict[str, Mapping[str, Any]]] = {}
    for node in names:
        st = reached.get(node)
        if st is None:
            continue
        for v in _volumes_of(st):
            by_vol.setdefault(int(v["vol"]), {})[node] = v
    return [_volume(vol, entries, reached) for vol, entries in sorted(by_vol.items())]


def _volume(
    vol: int, entries: Mapping[str, Mapping[str, Any]], reached: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """One volume, from what every node that answered says of it."""
    any_entry = next(iter(entries.values()))
    path = str(any_entry.get("path", "?"))
    label = f"volume {path} ({vol})"
    # The newest epoch any node follows names the primary; nodes that act as primary in
    # an older one are claims to show (an old primary on the minority side).
    newest = max(entries.values(), key=lambda e: _int(e.get("epoch")) or 0)
    epoch = _int(newest.get("epoch")) or 1
    primary = str(newest.get("primary", "?"))
    head = entries.get(primary)
    leads = head is not None and head.get("role") == PRIMARY and _int(head.get("epoch")) == epoch
    claims = [
        {"node": node, "epoch": _int(e.get("epoch"))}
        for node, e in entries.items()
        if e.get("role") == PRIMARY and node != primary
    ]
    problems = [
        f"{label}: {c['node']} still acts as its primary in epoch {c['epoch']}; the others "
        f"follow {primary} in epoch {epoch}"
        for c in claims
    ]
    sites_cfg = [str(s) for s in any_entry.get("sites") or []]
    seen = {
        str(st.get("site")): st
        for st in (head.get("sites_state") or [] if leads and head is not None else [])
        if isinstance(st, Mapping)
    }
    top = _int(head.get("applied")) if leads and head is not None else None
    lost = _unreachable_from(reached.get(primary)) if leads else set()
    sites = []
    for site in sites_cfg:
        s = _site(site, primary, leads, entries.get(site), seen.get(site), top)
        if site in lost and s["state"] != PRIMARY:
            s["state"] = UNREACHABLE  # its primary's heartbeat does not reach it
        sites.append(s)
    if not leads:
        if primary in reached:
            problems.append(
                f"{label}: {primary}, its primary in epoch {epoch}, does not act as one"
            )
        else:
            problems.append(f"{label}: its primary {primary} (epoch {epoch}) is not reached")
    else:
        majority = len(sites_cfg) // 2 + 1
        current = sum(s["state"] in (PRIMARY, IN_SYNC) for s in sites)
        if current < majority:
            problems.append(
                f"{label}: {current} of its {len(sites_cfg)} sites in sync, updates need "
                f"{majority}: read-only"
            )
        for s in sites:
            if s["state"] not in (PRIMARY, IN_SYNC):
                lag = f", {s['lag']} updates behind" if s.get("lag") else ""
                problems.append(f"{label}: site {s['node']} {s['state']}{lag}")
    return {
        "vol": vol,
        "path": path,
        "primary": primary,
        "epoch": epoch,
        "primary_reached": leads,
        "claims": claims,
        "sites": sites,
        "last_check": _last_check(entries.values()),
        "_problems": problems,
    }


def _unreachable_from(status: Mapping[str, Any] | None) -> set[str]:
    """The peers a node's heartbeat does not reach."""
    peers = status.get("peers") if status is not None else None
    return {
        str(p.get("name"))
        for p in peers or []
        if isinstance(p, Mapping) and p.get("state") == "unreachable"
    }


def _site(
    site: str,
    primary: str,
    leads: bool,
    own: Mapping[str, Any] | None,
    seen: Mapping[str, Any] | None,
    top: int | None,
) -> dict[str, Any]:
    applied = _int(own.get("applied")) if own is not None else None
    if applied is None and seen is not None:
        applied = _int(seen.get("applied"))
        if applied is not None and applied < 0:  # the primary has not heard from it yet
            applied = None
    out: dict[str, Any] = {
        "node": site,
        "role": own.get("role") if own is not None else None,
        "reached": own is not None,
        "applied": applied,
        "lag": None,
        "in_sync": None,
        "diverged": None,
        "lease": own.get("lease") if own is not None and "lease" in own else None,
        "lease_left": None,
        "error": None,
        "heal": None,
    }
    if site == primary and leads:
        out["state"] = PRIMARY
        out["lag"] = 0
        return out
    if seen is not None:
        out["in_sync"] = bool(seen.get("in_sync"))
        out["diverged"] = bool(seen.get("diverged"))
        out["lag"] = _int(seen.get("lag"))
        out["lease_left"] = seen.get("lease")
        out["error"] = seen.get("error") or None
        heal = seen.get("heal")
        out["heal"] = dict(heal) if isinstance(heal, Mapping) else None
        mark = site_mark(seen)
        out["state"] = UNREACHABLE if own is None and mark == BEHIND else mark
    elif not leads:
        out["state"] = NO_PRIMARY if own is not None else UNREACHABLE
    else:  # the primary does not count it among its sites (being created, or not adopted)
        out["state"] = BEHIND if own is not None else UNREACHABLE
    if out["lag"] is None and top is not None and applied is not None:
        out["lag"] = max(0, top - applied)
    return out


def _last_check(entries: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The newest cross-replica check any node reports of the volume (the ``check`` hook)."""
    checks = [
        e["check"]
        for e in entries
        if isinstance(e.get("check"), Mapping) and isinstance(e["check"].get("time"), int | float)
    ]
    if not checks:
        return None
    return dict(max(checks, key=lambda c: float(c["time"])))
