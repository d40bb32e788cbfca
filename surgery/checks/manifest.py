"""`surgery verify`'s check: a written checkpoint's structure, plus its manifest when it has one.

The manifest is ``OUT/surgery-manifest.json`` holding ``{"files": {relative name: sha256 hex}}``
(``surgery.writer.manifest``). Every listed file must exist inside OUT and hash to its entry, and every
``.safetensors`` file in OUT must be listed (an unlisted shard means the manifest is stale).
"""

from __future__ import annotations

import re
from pathlib import Path

from surgery import console
from surgery.checks.structure import check_structure
from surgery.errors import SurgeryError
from surgery.io.shard_files import read_json
from surgery.writer.manifest import MANIFEST_NAME, sha256_file


def manifest_problems(directory) -> tuple[list[str], int] | None:
    """(problems, files checked) for OUT's manifest, or None when OUT has no manifest."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
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
