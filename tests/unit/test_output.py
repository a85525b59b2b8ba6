"""tools/output.py: tables that scripts can split, and the progress bar of ``dfs fsck``."""

from __future__ import annotations

import io

from dfs_tools import output as O
from rich.console import Console
from rich.text import Text


def test_plain_tables_never_wrap_and_take_cells_literally() -> None:
    long = "/srv/" + "x" * 300 + "/[bold]not markup[/bold] :smile:"
    lines = O.render(
        O.table(["ID", "PATH", "NOTE"], [["7", long, ""], ["123", "/", "ok"]], right=(0,))
    )
    assert lines == [
        " ID  PATH" + " " * (len(long) - 4) + "  NOTE",
        f"  7  {long}",
        "123  /" + " " * (len(long) - 1) + "  ok",
    ]
    assert not any("\x1b" in line for line in lines)


def test_colour_only_when_asked_and_styles_survive() -> None:
    t = O.table(["A"], [[Text("bad", style="bold red")]])
    assert O.render(t) == ["A", "bad"]
    coloured = O.render(t, colour=True, indent=2)
    assert any("\x1b[" in line for line in coloured) and coloured[1].startswith("  ")


def test_progress_bar_shows_count_and_phase_then_goes_away() -> None:
    out = io.StringIO()
    bar = O.ProgressBar(delay=0, console=Console(file=out, force_terminal=True, width=100))
    bar("checking inodes", 5, 10)
    bar("verifying data", 3, 4)
    bar.close()
    text = out.getvalue()
    assert "verifying data" in text and "3/4" in text
    assert bar._bar is None  # stopped: its thread is gone


def test_progress_bar_waits_for_its_delay() -> None:
    out = io.StringIO()
    bar = O.ProgressBar(delay=3600, console=Console(file=out, force_terminal=True))
    bar("checking inodes", 5, 10)
    bar.close()
    assert out.getvalue() == ""
