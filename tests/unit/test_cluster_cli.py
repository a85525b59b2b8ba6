"""``dfs cluster``'s printed commands: ones that work when pasted into the caller's shell."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from dfs_tools import cluster as CL


@pytest.fixture
def venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository at tmp_path/repo with .venv/bin/dfs; the caller's shell is in the repo."""
    bin_ = tmp_path / "repo" / ".venv" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "dfs").write_text("#!/bin/sh\n")
    monkeypatch.setenv(CL.CALLER_DIR, str(tmp_path / "repo"))
    return bin_ / "dfs"


def test_not_on_path_it_names_the_program_relative_to_the_caller(venv: Path) -> None:
    assert CL.dfs_command(str(venv), which="") == ".venv/bin/dfs"


def test_on_path_it_is_just_dfs(venv: Path) -> None:
    assert CL.dfs_command(str(venv), which=str(venv)) == "dfs"
    other = venv.parent.parent.parent / "elsewhere-dfs"
    other.write_text("")
    assert CL.dfs_command(str(venv), which=str(other)) == ".venv/bin/dfs"  # another dfs


def test_a_caller_outside_gets_an_absolute_quoted_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prog = tmp_path / "my tools" / "dfs"
    prog.parent.mkdir()
    prog.write_text("")
    monkeypatch.setenv(CL.CALLER_DIR, str(tmp_path / "somewhere"))
    assert CL.dfs_command(str(prog), which="") == f"'{prog}'"


def test_run_as_a_module_without_a_script_beside_the_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python3"))
    assert (
        CL.dfs_command("/x/dfs_tools/__main__.py", which="") == f"{tmp_path}/python3 -m dfs_tools"
    )


def test_the_dir_option_is_relative_to_the_caller_too(venv: Path) -> None:
    repo = venv.parent.parent.parent
    assert CL._caller_path(repo / "run" / "cluster") == "run/cluster"
    assert CL._caller_path(repo) == "."
    assert CL._caller_path(repo / "x") == "./x"
    assert CL._caller_path(repo.parent) == str(repo.parent)
