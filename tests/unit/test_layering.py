"""Imports go one way: mountd -> dfs and tools -> dfs; only mountd imports pyfuse3."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(pkg: str) -> list[tuple[str, str]]:
    out = []
    for path in sorted((ROOT / pkg).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out += [(str(path.relative_to(ROOT)), a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.append((str(path.relative_to(ROOT)), node.module))
    return out


@pytest.mark.parametrize(
    ("pkg", "forbidden"),
    [
        ("dfs", ("mountd", "dfs_tools", "tools", "pyfuse3")),
        ("tools", ("mountd", "pyfuse3")),
    ],
)
def test_imports_go_one_way(pkg: str, forbidden: tuple[str, ...]) -> None:
    bad = [(where, mod) for where, mod in _imports(pkg) if mod.split(".")[0] in forbidden]
    assert not bad
