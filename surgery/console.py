"""Terminal output shared by every command: one rich console on stderr, verbosity, progress bars."""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console

console = Console(stderr=True, highlight=False)  # messages, tables, progress
stdout = Console(highlight=False, soft_wrap=True)  # machine-readable output (--json)
VERBOSITY = {"level": 0}  # -1 quiet, 0 normal, 1 verbose


def info(message: str) -> None:
    if VERBOSITY["level"] >= 0:
        console.print(message, soft_wrap=True)  # one message, one line: the terminal wraps, logs stay greppable


def note(message: str) -> None:
    if VERBOSITY["level"] >= 0:
        console.print(f"[yellow]note:[/] {message}", soft_wrap=True)


def warn(message: str) -> None:
    console.print(f"[bold yellow]warning:[/] {message}", soft_wrap=True)


def progress_enabled() -> bool:
    return VERBOSITY["level"] >= 0 and sys.stderr.isatty()


@contextlib.contextmanager
def progress(description: str, total: int, unit_bytes: bool = True):
    """A progress bar; yields advance(n, text=None). Silent when quiet or not on a terminal."""
    if not progress_enabled():
        yield lambda amount, text=None: None
        return
    from rich.progress import (  # lazy: a run with no bar (a log, -q, --json) never loads rich.progress
        BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn)

    columns = [TextColumn("{task.description}"), BarColumn()]
    columns += [DownloadColumn(), TransferSpeedColumn()] if unit_bytes else [MofNCompleteColumn()]
    columns += [TimeRemainingColumn(), TextColumn("[dim]{task.fields[current]}")]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total, current="")

        def advance(amount, text=None):
            bar.update(task, advance=amount, current=(text or "")[-60:])

        yield advance
