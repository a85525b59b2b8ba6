"""``dfs``: the admin command line (installed as the package ``dfs_tools``).

Thin by design: each command parses options, calls into ``dfs`` and prints.
The logic of ``dfs fsck`` lives in ``dfs/check``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import click

from dfs.check.checker import Finding
from dfs.check.fsck import EXIT_OPERATIONAL, FsckError, FsckResult, fsck
from dfs.check.scan import Progress


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Administer dfs nodes and their data directories."""


class _Status:
    """Progress on a terminal's stderr: one status line, shown only once a run takes a while."""

    DELAY = 1.0
    INTERVAL = 0.1

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.last = 0.0
        self.shown = False

    def __call__(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.start < self.DELAY or now - self.last < self.INTERVAL:
            return
        self.last = now
        pct = f" ({100 * done // total}%)" if total else ""
        sys.stderr.write(f"\r\x1b[K{what}: {done}/{total}{pct}")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


def _finding_line(f: Finding) -> str:
    tag = "" if f.repairable else " [not repairable]"
    return f"{f.code} {f.ino:#x}: {f.message}{tag}"


def _finding_json(f: Finding) -> dict[str, Any]:
    return {
        "code": f.code,
        "ino": f.ino,
        "ino_hex": f"{f.ino:#x}",
        "message": f.message,
        "repairable": f.repairable,
    }


def _summary(r: FsckResult, repair: bool) -> str:
    n = len(r.findings)
    if not n:
        return f"{r.data_dir}: clean"
    if not repair:
        fixable = sum(f.repairable for f in r.findings)
        return (
            f"{r.data_dir}: {n} problem{'s' if n != 1 else ''} found "
            f"({fixable} repairable with --repair); nothing changed"
        )
    if not r.remaining:
        return f"{r.data_dir}: {n} problem{'s' if n != 1 else ''} found, all repaired"
    return f"{r.data_dir}: {n} problems found, {len(r.remaining)} left after repair"


@main.command(name="fsck")
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Data directory of the node (its daemon must be stopped).",
)
@click.option("--repair", is_flag=True, help="Fix what can be fixed safely (default: only check).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option(
    "--no-data", is_flag=True, help="Skip reading file contents (no checksum verification)."
)
def fsck_cmd(data_dir: Path, repair: bool, as_json: bool, no_data: bool) -> None:
    """Check the consistency of a stopped node's data directory, and optionally repair it.

    Without --repair nothing is changed. Repairs never delete user data:
    unreachable files go to /lost+found, and a block whose checksum does not
    match is re-hashed and reported (its contents may be corrupt).

    Exit codes: 0 no problems, 1 problems found and all repaired, 4 problems
    left (not repaired, or not repairable), 8 operational error (in use by a
    running daemon, not a dfs directory, wrong format), 2 bad usage.
    """
    progress: Progress | None = _Status() if sys.stderr.isatty() and not as_json else None
    try:
        result = fsck(data_dir, repair=repair, verify_data=not no_data, progress=progress)
    except FsckError as exc:
        _close(progress)
        click.echo(f"dfs fsck: {exc}", err=True)
        if as_json:
            click.echo(
                json.dumps(
                    {"data_dir": str(data_dir), "error": str(exc), "exit_code": EXIT_OPERATIONAL}
                )
            )
        sys.exit(EXIT_OPERATIONAL)
    except Exception as exc:  # noqa: BLE001 - a bug: say so, exit as an operational error
        _close(progress)
        traceback.print_exc()
        click.echo(f"dfs fsck: internal error (a bug in dfs): {exc}", err=True)
        sys.exit(EXIT_OPERATIONAL)
    _close(progress)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "data_dir": str(result.data_dir),
                    "clean_shutdown": result.clean_shutdown,
                    "findings": [_finding_json(f) for f in result.findings],
                    "repaired": result.repaired,
                    "remaining": [_finding_json(f) for f in result.remaining],
                    "exit_code": result.exit_code,
                },
                indent=2,
            )
        )
    else:
        if not result.clean_shutdown:
            click.echo("note: the last daemon did not stop cleanly; dfs-mountd recovers at start")
        for f in result.findings:
            click.echo(_finding_line(f))
        for line in result.repaired:
            click.echo(f"repaired: {line}")
        if repair:
            for f in result.remaining:
                click.echo(f"left: {_finding_line(f)}")
        click.echo(_summary(result, repair))
    sys.exit(result.exit_code)


def _close(progress: Progress | None) -> None:
    if isinstance(progress, _Status):
        progress.close()
