"""`surgery inspect`: a checkpoint's architecture, layout, parameter counts and problems (``checks.inspection``).

A directory holding only config.json is sized from the family table (``checks.sizing``): total and active
parameters, per-layer kinds and bytes, before anyone downloads the weights."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import click

from surgery import console
from surgery.checks import sizing
from surgery.checks.inspection import Report, analyse
from surgery.checks.inspection_view import print_report
from surgery.errors import SurgeryError
from surgery.io.checkpoint import Checkpoint


@dataclass(frozen=True)
class InspectOptions:
    tensors: bool = False  # list every tensor with shape, dtype, shard and byte offset
    filter: str | None = None  # only tensors whose name matches this regular expression (implies tensors)
    stats: bool = False  # stream every tensor once: min/max/mean/std, NaN/Inf counts

    def check(self) -> None:
        if self.filter:
            try:
                re.compile(self.filter)
            except re.error as exc:
                raise SurgeryError(f"--filter {self.filter!r} is not a valid regular expression: {exc}") from None


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--tensors", is_flag=True, help="List every tensor with shape, dtype, shard and byte offset.")
@click.option("--filter", metavar="REGEX", help="Only tensors whose name matches REGEX (implies --tensors).")
@click.option("--stats", is_flag=True, help="Stream every tensor once: min/max/mean/std, NaN/Inf counts.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--strict", is_flag=True, help="Exit with 2 when problems are found.")
def command(path, as_json, strict, **options):
    """Show PATH's architecture, tensor layout, parameter counts and problems."""
    report = run(path, InspectOptions(**options))
    if as_json:
        console.stdout.print_json(json.dumps(report.to_json()))
        for warning in report.warnings:
            console.warn(warning)
    else:
        print_report(report)
    if strict and report.problems:
        raise SurgeryError(f"{path}: {len(report.problems)} problem(s) found, first: {report.problems[0]}")


def run(path, options: InspectOptions = InspectOptions()) -> Report:
    """A checkpoint's architecture, expert layout, parameter counts and problems, as an inspect ``Report``
    (``report.to_json()`` is what ``surgery inspect --json`` prints); a directory holding only config.json is
    sized from config.json (``report.config_only``; ``--stats`` needs the weights)."""
    options.check()
    with sizing.config_only(not options.stats, needs="--stats"), Checkpoint.open(path) as checkpoint:
        return analyse(checkpoint, options.tensors, options.filter, options.stats)
