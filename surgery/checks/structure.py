"""Structure check of a checkpoint without loading a model: headers, config.json and a NaN/Inf scan.

- every tensor the family (``surgery.families``) expects for this config.json is present with the shape the
  config implies, and no other tensor is present (the comparison ``surgery inspect`` makes);
- the index is consistent: every listed shard exists and holds exactly the tensors listed for it
  (checked when the checkpoint is opened), ``metadata.total_size`` equals the tensor bytes, and no
  stray ``.safetensors`` file sits beside an index that does not list it;
- with ``scan``: no tensor holds NaN or Inf, read one block of rows at a time (bounded memory).
"""

from __future__ import annotations

from pathlib import Path

from surgery import console
from surgery.checks.inspection import analyse
from surgery.errors import SurgeryError
from surgery.io.checkpoint import INDEX_NAME, Checkpoint
from surgery.io.dtypes import FLOAT_DTYPES
from surgery.io.finite import nonfinite_counts

SCAN_BLOCK_BYTES = 64 * 2**20


def check_structure(path, scan: bool = True) -> dict:
    """A JSON-ready report: problems (the checkpoint is wrong) and warnings (worth knowing)."""
    with Checkpoint.open(path, require_config=True) as checkpoint:
        report = analyse(checkpoint)
        problems = list(report.problems)
        warnings = list(report.warnings)
        problems += index_problems(checkpoint)
        warnings += stray_shards(checkpoint)
        nonfinite = {}
        if scan:
            nonfinite = scan_nonfinite(checkpoint)
            problems += [f"{checkpoint.tensors[name].file.name}: tensor {name!r} has {counts['nan']} NaN and "
                         f"{counts['inf']} Inf values" for name, counts in nonfinite.items()]
        return {
            "path": str(path),
            "architecture": report.architecture,
            "family": report.family,
            "expert_layout": report.expert_layout,
            "tensors": len(checkpoint.tensors),
            "bytes": checkpoint.total_bytes,
            "shards": [shard.name for shard in checkpoint.shards],
            "scanned": scan,
            "nonfinite": nonfinite,
            "problems": problems,
            "warnings": warnings,
        }


def require_structure(path, scan: bool = False) -> dict:
    """check_structure, raising SurgeryError naming the first problems when there are any."""
    report = check_structure(path, scan)
    problems = report["problems"]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise SurgeryError(f"{path}: structure check failed: {'; '.join(problems[:3])}{more}")
    return report


def index_problems(checkpoint: Checkpoint) -> list[str]:
    if checkpoint.index is None:
        return []
    metadata = checkpoint.index.get("metadata")
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    if total is None:
        return []
    actual = checkpoint.total_bytes
    if not isinstance(total, int) or total != actual:
        return [f"{INDEX_NAME}: metadata.total_size is {total!r}, the tensors hold {actual} bytes"]
    return []


def stray_shards(checkpoint: Checkpoint) -> list[str]:
    if checkpoint.index is None:
        return []
    listed = {shard.name for shard in checkpoint.shards}
    return [f"{file.name} is not listed in {INDEX_NAME} (transformers ignores it)"
            for file in sorted(checkpoint.directory.glob("*.safetensors")) if file.name not in listed]


def scan_nonfinite(checkpoint: Checkpoint, block_bytes: int = SCAN_BLOCK_BYTES) -> dict[str, dict]:
    """{tensor: {"nan": n, "inf": m}} for every floating tensor holding a non-finite value."""
    found = {}
    names = [name for name, info in checkpoint.tensors.items() if info.dtype in FLOAT_DTYPES]
    with console.progress("NaN/Inf scan", sum(checkpoint.tensors[n].nbytes for n in names)) as advance:
        for name in names:
            info = checkpoint.tensors[name]
            nan = inf = 0
            rows = info.shape[0] if info.shape else 0
            if rows and info.nbytes > block_bytes:
                step = max(1, block_bytes // (info.nbytes // rows))
                blocks = (checkpoint.read_rows(name, range(start, min(rows, start + step)))
                          for start in range(0, rows, step))
            else:
                blocks = iter([checkpoint.read(name)])
            for block in blocks:
                counts = nonfinite_counts(block) or (0, 0)
                nan, inf = nan + counts[0], inf + counts[1]
            if nan or inf:
                found[name] = {"nan": nan, "inf": inf}
            advance(info.nbytes, name)
    return found


def print_structure(report: dict) -> None:
    out = console.stdout
    status = "[green]ok[/]" if not report["problems"] else f"[red]{len(report['problems'])} problem(s)[/]"
    scanned = ", NaN/Inf scanned" if report["scanned"] else ""
    out.print(f"[bold]{report['path']}[/]: {report['architecture']}, {report['tensors']} tensors in "
              f"{len(report['shards'])} shard(s){scanned}: {status}")
    for problem in report["problems"]:
        out.print(f"  [red]problem:[/] {problem}")
    for warning in report["warnings"]:
        out.print(f"  [yellow]warning:[/] {warning}")


def problems_error(path, report: dict) -> SurgeryError:
    count = len(report["problems"])
    return SurgeryError(f"{Path(path)}: {count} problem(s) found, first: {report['problems'][0]}")
