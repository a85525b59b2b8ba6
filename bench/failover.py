"""How long updates stop when a volume's primary dies or vanishes from the network.

    .venv/bin/python -m bench.failover [--rounds N] [--kinds kill,partition,promote] [--json FILE]

A 3-node local cluster (``dfs cluster up --netns``: each node in its own network namespace,
so "vanishes from the network" is a real partition). Each round finds the root volume's
primary, then either

- **kill**: ``kill -9`` of its daemon (``dfs cluster stop NODE --kill``), or
- **partition**: cuts it off from the other two (``dfs cluster partition``),

- **promote**: a planned switch-over to another site (``dfs volume promote``) while every
  node makes updates in a loop: the figure is the longest any update took (per node) over a
  window around the switch, and every update must succeed (the issue's target: at most a
  second of unavailability);

and measures (kill, partition), on each surviving node's mount, the time from that moment to
the first ``mkdir`` that succeeds (tried every 50 ms; each try fails at once with ``EROFS`` or after
``timeouts.call`` with ``ETIMEDOUT``, so the figure includes the tail of one try). Then the
old primary comes back (restarted, or the partition healed), and the next round waits until
every node is in sync again. The issue's target: updates work again within 10 s with the
default timeouts (``failover_after`` 3 s, lease 3 s, call 5 s).

Reports, per kind, every round's figure per node, the median and the spread. Needs root
(namespaces, FUSE). Everything it starts it stops, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from dfs_tools.launcher import LocalCluster

from dfs.cluster.control import request

TRY_EVERY = 0.05
LIMIT = 60.0
NODES = ["n1", "n2", "n3"]


def _root_volume(c: LocalCluster, node: str) -> dict[str, Any]:
    got = request(c.node(node).control_path, "volume.list", timeout=5.0)
    return next(v for v in got if v["vol"] == 1)


def _primary(c: LocalCluster, among: list[str]) -> str:
    for n in among:
        try:
            v = _root_volume(c, n)
        except Exception:  # noqa: BLE001 - a node that does not answer says nothing
            continue
        if v.get("role") == "primary":
            return n
    raise RuntimeError("no node orders the root volume")


def _first_update(mnt: Path, tag: str, t0: float, out: dict[str, float], node: str) -> None:
    k = 0
    while time.monotonic() - t0 < LIMIT:
        k += 1
        try:
            os.mkdir(mnt / f"{tag}-{node}-{k}")
            out[node] = time.monotonic() - t0
            return
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.ETIMEDOUT, errno.EHOSTDOWN, errno.EIO):
                raise
        time.sleep(TRY_EVERY)
    out[node] = float("inf")


def _settled(c: LocalCluster) -> None:
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline:
        try:
            p = _primary(c, NODES)
            sites = _root_volume(c, p).get("sites_state", [])
            if sites and all(s.get("in_sync") for s in sites):
                return
        except (RuntimeError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError("the cluster did not settle")


def _round(c: LocalCluster, kind: str, r: int) -> dict[str, Any]:
    _settled(c)
    p = _primary(c, NODES)
    others = [n for n in NODES if n != p]
    out: dict[str, float] = {}
    t0 = time.monotonic()
    if kind == "kill":
        c.stop(p, kill=True)
    else:
        c.partition([p, ",".join(others)])
    threads = [
        threading.Thread(
            target=_first_update, args=(c.node(n).mountpoint, f"{kind}{r}", t0, out, n)
        )
        for n in others
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if kind == "kill":
        c.start(p)
    else:
        c.partition(None)
    return {"old_primary": p, "seconds": out}


def _updates(mnt: Path, tag: str, stop: threading.Event, out: dict[str, Any], node: str) -> None:
    """mkdir in a loop until ``stop``: the slowest one and any failure."""
    slowest, failed, k = 0.0, [], 0
    while not stop.is_set():
        k += 1
        t = time.monotonic()
        try:
            os.mkdir(mnt / f"{tag}-{node}-{k}")
        except OSError as exc:
            failed.append(exc.strerror)
        slowest = max(slowest, time.monotonic() - t)
    out[node] = {"slowest_s": round(slowest, 3), "updates": k, "failed": failed}


def _promote_round(c: LocalCluster, r: int) -> dict[str, Any]:
    _settled(c)
    p = _primary(c, NODES)
    to = [n for n in NODES if n != p][r % 2]
    out: dict[str, Any] = {}
    stop = threading.Event()
    threads = [
        threading.Thread(target=_updates, args=(c.node(n).mountpoint, f"promote{r}", stop, out, n))
        for n in NODES
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        got = request(
            c.node(p).control_path, "volume.promote", {"path": "/", "to": to}, timeout=30.0
        )
        took = time.monotonic() - t0
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return {
        "old_primary": p,
        "new_primary": to,
        "command_s": round(took, 3),
        "answer": got,
        "seconds": {n: v["slowest_s"] for n, v in out.items()},
        "nodes": out,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--kinds", default="kill,partition,promote", help="comma-separated")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="dfs-failover-bench-", dir=args.dir))
    c = LocalCluster(root, say=lambda m: print(m, file=sys.stderr))
    ap_kinds = args.kinds.split(",")
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in ap_kinds}
    try:
        c.up(nodes=3, in_netns=True)
        for r in range(args.rounds):
            for kind in ap_kinds:
                got = _promote_round(c, r) if kind == "promote" else _round(c, kind, r)
                results[kind].append(got)
                print(f"{kind} round {r + 1}: {got}", file=sys.stderr)
    finally:
        c.down()
    summary = {}
    for kind, rounds in results.items():
        xs = [s for g in rounds for s in g["seconds"].values()]
        if xs:
            summary[kind] = {
                "median_s": round(statistics.median(xs), 2),
                "min_s": round(min(xs), 2),
                "max_s": round(max(xs), 2),
                "samples": len(xs),
            }
    doc = {"rounds": results, "summary": summary, "when": time.strftime("%Y-%m-%d %H:%M")}
    text = json.dumps(doc, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
