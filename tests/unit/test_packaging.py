"""pyproject.toml lists every package, so a non-editable install is complete."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_installed() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapped = {name: ROOT / path for name, path in cfg.get("package-dir", {}).items()}
    found = set()
    for top in ("dfs", "mountd"):
        for init in (ROOT / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(ROOT).parts))
    for name, path in mapped.items():
        for init in path.rglob("__init__.py"):
            found.add(".".join((name, *init.parent.relative_to(path).parts)))
    assert found == listed
