"""Imports go one way: mountd -> dfs and tools -> dfs; only mountd imports pyfuse3.

The core ``dfs`` is also kept free of deployment and presentation: the local
cluster launcher (tools/launcher.py, installed as ``dfs_tools.launcher``),
psutil (processes) and rich (terminal output) are for the tools only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(pkg: str, root: Path = ROOT) -> list[tuple[str, str]]:
    out = []
    for path in sorted((root / pkg).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out += [(str(path.relative_to(root)), a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.append((str(path.relative_to(root)), node.module))
    return out


def _forbidden(pkg: str, forbidden: tuple[str, ...], root: Path = ROOT) -> list[tuple[str, str]]:
    return [(where, mod) for where, mod in _imports(pkg, root) if mod.split(".")[0] in forbidden]


@pytest.mark.parametrize(
    ("pkg", "forbidden"),
    [
        ("dfs", ("mountd", "dfs_tools", "tools", "pyfuse3", "psutil", "rich")),
        ("tools", ("mountd", "pyfuse3")),
    ],
)
def test_imports_go_one_way(pkg: str, forbidden: tuple[str, ...]) -> None:
    assert not _forbidden(pkg, forbidden)


def test_the_check_catches_each_kind_of_import(tmp_path: Path) -> None:
    (tmp_path / "dfs" / "sub").mkdir(parents=True)
    (tmp_path / "dfs" / "sub" / "m.py").write_text(
        "import psutil\nfrom rich.table import Table\nfrom dfs_tools.launcher import X\n"
        "from . import fine\nimport dfs.errors\n"
    )
    forbidden = ("dfs_tools", "psutil", "rich")
    assert _forbidden("dfs", forbidden, root=tmp_path) == [
        ("dfs/sub/m.py", "psutil"),
        ("dfs/sub/m.py", "rich.table"),
        ("dfs/sub/m.py", "dfs_tools.launcher"),
    ]


def test_the_launcher_is_not_in_the_core() -> None:
    assert not (ROOT / "dfs" / "cluster" / "local.py").exists()
    assert (ROOT / "tools" / "launcher.py").exists()
