"""What the admin CLI prints, drawn by rich: tables, and a progress bar on a terminal's stderr.

Tables are never wrapped or truncated by rich (a path or digest must come
out whole, to be copied): one line per row, columns two spaces apart. On a
terminal they may be coloured (``NO_COLOR`` is honoured); anywhere else (a
pipe, a file, a test) they are plain text without trailing spaces, so scripts
may split them on whitespace. Cell text is taken
literally (no rich markup), so a path with ``[brackets]`` prints as it is.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

Cell = str | Text
UNBOUNDED = 1 << 16  # the width tables are drawn for: wider than any row


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stdout if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed (a test runner's capture)
        return False


def table(
    headers: Sequence[str], rows: Iterable[Sequence[Cell]], *, right: Iterable[int] = ()
) -> Table:
    """A table without borders: a bold header line, then one line per row; ``right``:
    the indexes of the columns to right-align (numbers)."""
    t = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
    right = set(right)
    for i, h in enumerate(headers):
        t.add_column(h, justify="right" if i in right else "left", no_wrap=True)
    for row in rows:
        t.add_row(*(c if isinstance(c, Text) else Text(c) for c in row))
    return t


def render(thing: Table | Text, *, colour: bool = False, indent: int = 0) -> list[str]:
    """``thing`` as lines of text: plain and unwrapped, or with ``colour`` for a terminal."""
    buf = io.StringIO()
    console = Console(
        file=buf,
        force_terminal=colour,
        color_system="standard" if colour else None,
        width=UNBOUNDED,
        highlight=False,
        emoji=False,
        markup=False,
    )
    console.print(thing)
    return [" " * indent + line.rstrip() for line in buf.getvalue().splitlines()]


def echo(thing: Table | Text, *, indent: int = 0) -> None:
    """Print ``thing`` on stdout: coloured on a terminal, plain otherwise."""
    colour = is_terminal()
    for line in render(thing, colour=colour, indent=indent):
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


class ProgressBar:
    """A ``Progress`` callback (what, done, total) that draws a bar with an ETA on a terminal's
    stderr, once a run has taken ``delay`` seconds, and erases it at ``close``."""

    def __init__(self, delay: float = 1.0, console: Console | None = None) -> None:
        self.delay = delay
        self.console = console or Console(stderr=True, highlight=False, emoji=False, markup=False)
        self.start = time.monotonic()
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._what = ""

    def __call__(self, what: str, done: int, total: int) -> None:
        if self._bar is None:
            if time.monotonic() - self.start < self.delay:
                return
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._bar.start()
        if self._task is None or what != self._what:  # a new phase: a new bar, a new ETA
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(what, total=total or None)
            self._what = what
        self._bar.update(self._task, completed=done, total=total or None)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._task = None
            self._what = ""
