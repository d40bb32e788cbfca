"""`surgery verify OUT`: structure check of a written checkpoint, plus its manifest when it has one.

The manifest is ``OUT/surgery-manifest.json`` holding ``{"files": {relative name: sha256 hex}}``.
Every listed file must exist inside OUT and hash to its entry, and every ``.safetensors`` file
in OUT must be listed (an unlisted shard means the manifest is stale).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import click

from surgery import console
from surgery.errors import SurgeryError

MANIFEST_NAME = "surgery-manifest.json"
HASH_BLOCK = 8 * 2**20


def sha256_file(path: Path, advance=lambda amount, text=None: None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
            advance(len(block), path.name)
    return digest.hexdigest()


def manifest_problems(directory) -> tuple[list[str], int] | None:
    """(problems, files checked) for OUT's manifest, or None when OUT has no manifest."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    from surgery.checkpoint import read_json

    manifest = read_json(manifest_path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise SurgeryError(f"{manifest_path}: expected an object with 'files': {{name: sha256 hex}}")
    problems = []
    root = directory.resolve()
    checked = []
    for name, expected in files.items():
        candidate = Path(name)
        if candidate.is_absolute() or ".." in candidate.parts or not (root / candidate).resolve().is_relative_to(root):
            problems.append(f"{MANIFEST_NAME}: entry {name!r} points outside {directory} (refused)")
        elif not re.fullmatch(r"[0-9a-fA-F]{64}", expected):
            problems.append(f"{MANIFEST_NAME}: entry {name!r} is not a sha256 hex digest: {expected!r}")
        elif not (directory / name).is_file():
            problems.append(f"{name}: listed in {MANIFEST_NAME} but missing")
        else:
            checked.append((name, expected.lower()))
    total = sum((directory / name).stat().st_size for name, _ in checked)
    with console.progress("sha256", total) as advance:
        for name, expected in checked:
            actual = sha256_file(directory / name, advance)
            if actual != expected:
                problems.append(f"{name}: sha256 {actual} differs from {MANIFEST_NAME} ({expected})")
    for shard in sorted(directory.glob("*.safetensors")):
        if shard.name not in files:
            problems.append(f"{shard.name}: not listed in {MANIFEST_NAME}")
    return problems, len(checked)


def verify(out, scan: bool = True) -> dict:
    """Structure report of OUT, with a "manifest" entry (files checked) and its problems added."""
    from surgery.structure import check_structure

    report = check_structure(out, scan=scan)
    found = manifest_problems(Path(out) if Path(out).is_dir() else Path(out).parent)
    if found is None:
        report["manifest"] = None
        report["warnings"].append(f"no {MANIFEST_NAME}: file hashes not checked")
    else:
        problems, checked = found
        report["manifest"] = {"files_checked": checked, "problems": len(problems)}
        report["problems"] += problems
    return report


@click.command("verify")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--no-scan", is_flag=True, help="Skip the NaN/Inf scan (headers, shapes, index and hashes only).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(out, no_scan, as_json):
    """Check OUT: tensors and shapes per config.json, index, NaN/Inf, and surgery-manifest.json hashes."""
    from surgery.structure import print_structure, problems_error

    report = verify(out, scan=not no_scan)
    if as_json:
        console.stdout.print_json(json.dumps(report))
    else:
        print_structure(report)
        if report["manifest"]:
            console.stdout.print(f"  manifest: {report['manifest']['files_checked']} file(s) hashed")
    if report["problems"]:
        raise problems_error(out, report)
