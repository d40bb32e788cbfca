"""The manifest of a written checkpoint: the sha256 of every file in it, so a damaged copy can be told later.

``surgery-manifest.json`` holds ``{"surgery_version", "operation", "total_bytes", "files": {name: sha256}}``;
``surgery verify`` checks a directory against it (``surgery.checks.manifest``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from surgery import __version__

MANIFEST_NAME = "surgery-manifest.json"
HASH_BLOCK = 8 * 2**20


def sha256_file(path: Path, advance=lambda amount, text=None: None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
            advance(len(block), path.name)
    return digest.hexdigest()


def write_manifest(directory: Path, plan, shard_digests: dict[str, str]) -> None:
    """sha256 of every file in `directory` (the shards' digests computed while they were written)."""
    files = dict(shard_digests)
    for path in sorted(directory.iterdir()):
        if path.name not in files and path.is_file():
            files[path.name] = sha256_file(path)
    manifest = {"surgery_version": __version__, "operation": plan.operation,
                "total_bytes": plan.total_bytes, "files": dict(sorted(files.items()))}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
