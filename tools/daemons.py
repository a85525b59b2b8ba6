"""The launcher's eyes: which process is a daemon it started, and whether a mount answers.

A daemon is known by its PID and its start time in clock ticks since boot (``start_ticks``,
the kernel's fixed record of it), so a reused PID is never taken for it; a mount is probed in
a helper thread with a deadline, so a hung daemon reads as "hung" instead of hanging the
launcher. tools/launcher.py decides what to do with the answers.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from dfs.mounts import is_mounted

PROBE_TIMEOUT = 2.0
LOG_TAIL = 20


def start_ticks(proc: psutil.Process) -> int:
    """When ``proc`` started, in clock ticks since boot: the kernel's own fixed record of it.

    Not psutil's ``create_time()``: that adds the boot time the kernel derives from the wall
    clock, which moves when the clock is stepped or slewed, so the same process can show two
    start times a second apart and be taken for a reused PID (a launcher flake under load).
    psutil keeps the ticks private, so this reads field 22 of /proc/PID/stat (after the
    command name, which may hold spaces and parentheses); a vanished process is psutil's
    NoSuchProcess, as for every other question asked of ``proc``.
    """
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        raise psutil.NoSuchProcess(proc.pid) from None
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def recorded_process(pid: object, start_time: object) -> psutil.Process | None:
    """The process ``pid`` if it exists and started at ``start_time``.

    ``start_time`` is what ``start_ticks`` gave at spawn (an int, as state.json always held
    before the launcher used psutil). A float is a record written by a launcher that used
    wall-clock create times: it matches within the second that boot time may have moved.
    """
    if not isinstance(pid, int) or pid <= 0 or isinstance(start_time, bool):
        return None
    if not isinstance(start_time, (int, float)):
        return None
    try:
        proc = psutil.Process(pid)
        if isinstance(start_time, float):
            return proc if abs(proc.create_time() - start_time) <= 1.0 else None
        return proc if start_ticks(proc) == start_time else None
    except psutil.Error:
        return None


def wait_exit(pid: int, timeout: float = 0) -> int | None:
    """Collect ``pid`` if it is our child and exits within ``timeout``; its exit status, else None.

    Negative for a signal, as ``subprocess`` has it.
    """
    try:
        return psutil.Process(pid).wait(timeout)
    except (psutil.TimeoutExpired, psutil.NoSuchProcess):
        return None


# --- mounts --------------------------------------------------------------------------------------


def mount_state(path: Path, timeout: float = PROBE_TIMEOUT) -> str:
    """``live``, ``stale`` (its daemon died), ``none``, ``hung`` (no answer) or ``error``."""
    if not is_mounted(path):
        return "none"
    result: list[str] = []

    def probe() -> None:
        try:
            if os.stat(path).st_dev == os.stat(path.parent).st_dev:
                result.append("none")
                return
            os.listdir(path)
            result.append("live")
        except OSError as exc:
            result.append("stale" if exc.errno == errno.ENOTCONN else "error")

    # A daemon that is alive but stuck would block this thread forever; it is a
    # daemon thread, so it cannot keep the launcher from exiting.
    t = threading.Thread(target=probe, name=f"probe {path}", daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else "hung"


def tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Started:
    """state.json: the daemons a launcher started (name -> pid and start ticks), written
    whole and replaced atomically; ``error(message)`` is what an unreadable file raises."""

    def __init__(self, path: Path, config: Path, error: Callable[[str], Exception]) -> None:
        self.path = path
        self.config = config
        self.error = error

    def entries(self) -> dict[str, dict[str, Any]]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise self.error(f"{self.path}: unreadable ({exc}); remove it") from None
        nodes = raw.get("nodes", {}) if isinstance(raw, dict) else {}
        return {k: v for k, v in nodes.items() if isinstance(v, dict)}

    def record(self, name: str, entry: dict[str, Any] | None) -> None:
        nodes = self.entries()
        if entry is None:
            nodes.pop(name, None)
        else:
            nodes[name] = entry
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": str(self.config), "nodes": nodes}, indent=2) + "\n")
        os.replace(tmp, self.path)
