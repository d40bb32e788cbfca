"""`surgery verify OUT`: structure check of a written checkpoint, plus its manifest (``checks.manifest``)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import click

from surgery import console
from surgery.checks.manifest import verify
from surgery.checks.structure import print_structure, problems_error


@dataclass(frozen=True)
class VerifyOptions:
    no_scan: bool = False  # skip the NaN/Inf scan: headers, shapes, index and hashes only


@click.command("verify")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--no-scan", is_flag=True, help="Skip the NaN/Inf scan (headers, shapes, index and hashes only).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(out, as_json, **options):
    """Check OUT: tensors and shapes per config.json, index, NaN/Inf, and surgery-manifest.json hashes."""
    report = run(out, VerifyOptions(**options))
    if as_json:
        console.stdout.print_json(json.dumps(report))
    else:
        print_structure(report)
        if report["manifest"]:
            console.stdout.print(f"  manifest: {report['manifest']['files_checked']} file(s) hashed")
    if report["problems"]:
        raise problems_error(out, report)


def run(out, options: VerifyOptions = VerifyOptions()) -> dict:
    """The structure report of OUT (tensors and shapes per config.json, index, NaN/Inf unless `no_scan`) with its
    manifest's hashes checked; problems are listed in it, not raised."""
    return verify(out, scan=not options.no_scan)
