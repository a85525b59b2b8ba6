"""Offline check (and repair) of a data directory: what ``dfs fsck`` runs, minus the printing.

Takes DIR/lock exactly as the daemon does, so it never runs beside a daemon
serving DIR. Without ``repair`` the metadata is opened read-only and nothing
in DIR but the lock file's pid line is written.

Exit codes, as e2fsck's: 0 no problem, 1 problems found and all repaired,
4 problems left (not repairable, or not repaired because ``repair`` is off),
8 operational error (raised as FsckError: locked, not a dfs directory, wrong
format version, unreadable store).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from dfs.check.checker import Finding, check
from dfs.check.repair import repair as repair_findings
from dfs.check.scan import Progress, get
from dfs.data.store import DataStore
from dfs.errors import StoreError
from dfs.lockfile import DataDirLock
from dfs.meta import schema as S
from dfs.meta.store import MetaStore

EXIT_CLEAN = 0
EXIT_REPAIRED = 1
EXIT_PROBLEMS = 4
EXIT_OPERATIONAL = 8


class FsckError(Exception):
    """The check could not run (exit code 8)."""


@dataclass
class FsckResult:
    data_dir: Path
    findings: list[Finding]
    repaired: list[str] = field(default_factory=list)
    remaining: list[Finding] = field(default_factory=list)
    clean_shutdown: bool = True

    @property
    def exit_code(self) -> int:
        if not self.findings:
            return EXIT_CLEAN
        return EXIT_PROBLEMS if self.remaining else EXIT_REPAIRED


def _check_layout(data_dir: Path) -> None:
    if not data_dir.is_dir():
        raise FsckError(f"{data_dir}: no such directory")
    if not (data_dir / "meta" / "data.mdb").is_file():
        raise FsckError(f"{data_dir}: not a dfs data directory (no meta/data.mdb)")
    if not (data_dir / "data").is_dir():
        raise FsckError(f"{data_dir}: not a dfs data directory (no data/ directory)")


def fsck(
    data_dir: Path,
    *,
    repair: bool = False,
    verify_data: bool = True,
    progress: Progress | None = None,
) -> FsckResult:
    """Check DIR offline; with ``repair``, fix what is repairable and check again."""
    _check_layout(data_dir)
    lock = DataDirLock(data_dir, owner="dfs fsck")
    try:
        lock.acquire()
    except (StoreError, OSError) as exc:
        raise FsckError(str(exc)) from exc
    try:
        try:
            meta = MetaStore.open(data_dir / "meta", create=False, readonly=not repair)
        except StoreError as exc:
            raise FsckError(str(exc)) from exc
        except lmdb.Error as exc:
            raise FsckError(f"{data_dir}: cannot read the metadata store: {exc}") from exc
        try:
            return _run(meta, DataStore(data_dir / "data"), data_dir, repair, verify_data, progress)
        except lmdb.Error as exc:
            raise FsckError(f"{data_dir}: metadata store error: {exc}") from exc
        finally:
            meta.close()
    finally:
        lock.release()


def _run(
    meta: MetaStore,
    data: DataStore,
    data_dir: Path,
    repair: bool,
    verify_data: bool,
    progress: Progress | None,
) -> FsckResult:
    with meta.read() as txn:
        clean = get(txn, S.META_CLEAN, meta.meta) != b"0"
    findings = check(meta, data, verify_data=verify_data, progress=progress)
    result = FsckResult(data_dir, findings, remaining=findings, clean_shutdown=clean)
    if repair and any(f.repairable for f in findings):
        result.repaired = repair_findings(meta, data, findings)
        meta.sync()
        os.sync()  # truncated and adopted data files too
        result.remaining = check(meta, data, verify_data=verify_data, progress=progress)
    return result
