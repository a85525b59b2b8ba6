"""Turning samples into figures: medians, ratios to local, targets, noise warnings, output.

A ratio is always dfs/local of the figure as printed: for rates (MB/s,
ops/s) higher is better and the target is a lower bound; for times (s) it
says how many times longer dfs took ("4.2x") and the target is an upper bound.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from bench.workloads import FigureSpec, Sample

SHORT_S = 0.1  # a local run shorter than this is mostly timer and scheduler noise
SPREAD = 0.25  # rounds further apart than this (of the median) are noisy
FOREIGN_CORES = 0.5  # other processes using more CPU than this while we measured
BUSY_MIN_S = 0.5


@dataclass
class Figure:
    spec: FigureSpec
    local: list[Sample]
    dfs: list[Sample]
    notes: list[str] = field(default_factory=list)

    def value(self, side: list[Sample]) -> float:
        return statistics.median(s.value(self.spec.unit) for s in side)

    @property
    def complete(self) -> bool:
        return bool(self.local) and bool(self.dfs)

    @property
    def ratio(self) -> float:
        local = self.value(self.local)
        return self.value(self.dfs) / local if local > 0 else float("inf")

    @property
    def passed(self) -> bool | None:
        t = self.spec.target
        if t is None:
            return None
        return self.ratio <= t if self.spec.is_time else self.ratio >= t

    @property
    def daemon_busy(self) -> float:
        """Share of the dfs run's wall time the daemon spent on a CPU (1.0 = one core)."""
        return statistics.median(s.cpu.daemon / max(s.seconds, 1e-9) for s in self.dfs)

    def check_noise(self, caches_work: bool) -> None:
        if self.spec.cold and not caches_work:
            self.notes.append("not cold: the page cache could not be dropped (needs root)")
        local_s = statistics.median(s.seconds for s in self.local)
        if local_s < SHORT_S:
            self.notes.append(f"local run took {local_s * 1000:.0f} ms (timer noise)")
        for name, side in (("local", self.local), ("dfs", self.dfs)):
            vals = [s.value(self.spec.unit) for s in side]
            if len(vals) > 1:
                med = statistics.median(vals)
                if med > 0 and (max(vals) - min(vals)) / med > SPREAD:
                    lo, hi = _num(min(vals), self.spec.unit), _num(max(vals), self.spec.unit)
                    self.notes.append(f"{name} rounds spread {lo}..{hi}")
            # CPU clocks tick every 10 ms: only long enough runs say anything.
            seconds = sum(s.seconds for s in side)
            if seconds >= BUSY_MIN_S:
                busy = sum(s.cpu.foreign for s in side) / seconds
                if busy > FOREIGN_CORES:
                    self.notes.append(
                        f"other processes/kernel threads used {busy:.1f} CPUs ({name} run)"
                    )


def _num(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _ratio(f: Figure) -> str:
    r = f.ratio
    return f"{r:.1f}x" if f.spec.is_time else f"{r:.2f}"


def _target(f: Figure) -> str:
    t = f.spec.target
    if t is None:
        return ""
    return f"<= {t:g}x" if f.spec.is_time else f">= {t:g}"


def table(figures: list[Figure]) -> str:
    head = (
        "workload",
        "unit",
        "local",
        "dfs",
        "dfs/local",
        "target",
        "result",
        "daemon cpu",
        "note",
    )
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    for f in figures:
        if not f.complete:
            continue
        mark = ""
        if f.notes:
            notes.append(f"[{len(notes) + 1}] {f.spec.label}: {'; '.join(f.notes)}")
            mark = f"[{len(notes)}]"
        p = f.passed
        rows.append(
            (
                f.spec.label,
                f.spec.unit,
                _num(f.value(f.local), f.spec.unit),
                _num(f.value(f.dfs), f.spec.unit),
                _ratio(f),
                _target(f),
                "" if p is None else "pass" if p else "MISS",
                f"{f.daemon_busy * 100:.0f}%",
                mark,
            )
        )
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    right = {2, 3, 4, 7}

    def line(r: tuple[str, ...]) -> str:
        cells = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    out = [line(head), line(tuple("-" * w for w in widths)), *map(line, rows)]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def _g(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def requests_table(figures: list[Figure], top: int = 8) -> str:
    """What each dfs figure cost in FUSE requests (from a --count-requests run).

    Per operation for ops/s figures, per MiB for MB/s, per file of the tree for
    the tree workloads. Handler time is wall time from call to return, so a
    handler that waits for a worker thread or a lock counts its wait. For
    metadata work, whose handlers run inline, daemon CPU per request minus
    handler time per request approximates the fixed cost of one request
    outside dfs (pyfuse3, trio, the /dev/fuse syscalls).
    """
    head = ("figure", "requests", "per", "", "daemon CPU/req", "handler/req", "request types")
    rows: list[tuple[str, ...]] = []
    for f in figures:
        if not any(s.requests for s in f.dfs):
            continue
        total: dict[str, list[int]] = {}
        for s in f.dfs:
            for k, (n, ns) in s.requests.items():
                t = total.setdefault(k, [0, 0])
                t[0] += n
                t[1] += ns
        count = sum(n for n, _ in total.values())
        if f.spec.unit == "ops/s":
            base, per = sum(s.amount for s in f.dfs), "op"
        elif f.spec.unit == "MB/s":
            base, per = sum(s.amount for s in f.dfs) / 2**20, "MiB"
        elif all(s.amount for s in f.dfs):
            base, per = sum(s.amount for s in f.dfs), "file"
        else:
            base, per = float(len(f.dfs)), "run"
        cpu = sum(s.cpu.daemon for s in f.dfs)
        handler_ns = sum(ns for _, ns in total.values())
        kinds = sorted(total.items(), key=lambda kv: -kv[1][0])[:top]
        desc = ", ".join(
            f"{k} {n / base:.3g} ({ns / max(n, 1) / 1e3:.0f} us)" for k, (n, ns) in kinds
        )
        rows.append(
            (
                f.spec.label,
                f"{count:,}",
                _g(count / base),
                f"/{per}",
                f"{cpu / max(count, 1) * 1e6:.0f} us",
                f"{handler_ns / max(count, 1) / 1e3:.0f} us",
                desc,
            )
        )
    if not rows:
        return "(no request counts: the daemon did not answer SIGUSR1)"
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    right = {1, 2, 4, 5}

    def line(r: tuple[str, ...]) -> str:
        cells = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    title = "dfs FUSE requests per operation; request types: count per op (handler time per call)"
    return "\n".join([title, line(head), line(tuple("-" * w for w in widths)), *map(line, rows)])


def to_json(path: Path, header: dict[str, object], figures: list[Figure]) -> None:
    def side(samples: list[Sample], unit: str) -> dict[str, object]:
        return {
            "values": [s.value(unit) for s in samples],
            "seconds": [s.seconds for s in samples],
            "daemon_cpu_s": [s.cpu.daemon for s in samples],
            "bench_cpu_s": [s.cpu.mine for s in samples],
            "foreign_cpu_s": [s.cpu.foreign for s in samples],
            "requests": [s.requests for s in samples],
        }

    out = {
        **header,
        "figures": [
            {
                "key": f.spec.key,
                "label": f.spec.label,
                "unit": f.spec.unit,
                "local": f.value(f.local),
                "dfs": f.value(f.dfs),
                "ratio": f.ratio,
                "target": f.spec.target,
                "target_is_upper_bound": f.spec.is_time,
                "passed": f.passed,
                "daemon_busy": f.daemon_busy,
                "notes": f.notes,
                "local_samples": side(f.local, f.spec.unit),
                "dfs_samples": side(f.dfs, f.spec.unit),
            }
            for f in figures
            if f.complete
        ],
    }
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
