"""The source tree that the tree workloads unpack: CPython's standard library, as a tarball.

Every machine that runs dfs has the Python it runs on, so the tree is the
standard library of the venv's base interpreter without site-packages,
__pycache__ and the config-* directory (a 45 MB static libpython, which would
turn a small-file test into a large-file one). The full run packs it twice
(``a/`` and ``b/``, about 4,900 files); the quick run takes the first 1,000
files. The tarball is built once and cached in bench/.cache/ (gitignored).
"""

from __future__ import annotations

import json
import os
import platform
import sysconfig
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
SKIP_DIRS = {"site-packages", "__pycache__"}


@dataclass(frozen=True)
class Tree:
    tarball: Path
    source: str
    files: int
    dirs: int
    symlinks: int
    bytes: int

    def describe(self) -> str:
        return (
            f"{self.files:,} files, {self.dirs:,} dirs, {self.bytes / 1e6:.0f} MB ({self.source})"
        )


def _walk(root: Path, limit: int | None) -> list[Path]:
    """Files, symlinks and directories under root in a stable order (parents first)."""
    out: list[Path] = []
    nfiles = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")
        )
        here = Path(dirpath)
        if here != root:
            out.append(here)
        for name in sorted(filenames):
            p = here / name
            if not (p.is_file() or p.is_symlink()):
                continue
            if limit is not None and nfiles >= limit:
                return out
            out.append(p)
            nfiles += 1
    return out


def tree(copies: int, limit: int | None) -> Tree:
    """The cached tarball for this shape, building it on first use."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shape = f"x{copies}" if limit is None else f"first{limit}"
    name = f"stdlib-{platform.python_version()}-{shape}"
    tarball, info = CACHE / f"{name}.tar", CACHE / f"{name}.json"
    if tarball.exists() and info.exists():
        d = json.loads(info.read_text())
        return Tree(
            tarball=tarball, **{k: d[k] for k in ("source", "files", "dirs", "symlinks", "bytes")}
        )
    CACHE.mkdir(exist_ok=True)
    paths = _walk(stdlib, limit)
    files = dirs = links = size = 0
    tmp = tarball.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for c in range(copies):
            prefix = chr(ord("a") + c) if copies > 1 else "."
            for p in paths:
                rel = Path(prefix) / p.relative_to(stdlib)
                tar.add(p, arcname=str(rel), recursive=False)
                if c == 0:
                    if p.is_symlink():
                        links += 1
                    elif p.is_dir():
                        dirs += 1
                    else:
                        files += 1
                        size += p.stat().st_size
    t = Tree(
        tarball=tarball,
        source=f"{stdlib} x{copies}" if limit is None else f"first {limit} files of {stdlib}",
        files=files * copies,
        dirs=dirs * copies,
        symlinks=links * copies,
        bytes=size * copies,
    )
    os.replace(tmp, tarball)
    d = asdict(t)
    del d["tarball"]
    info.write_text(json.dumps(d, indent=1) + "\n")
    return t
