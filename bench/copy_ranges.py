"""A second I/O floor for a prune: the byte ranges surgery's plan copies, copied by a bare loop of the kernel copy.

    python bench/copy_ranges.py SPANS.json OUT_FILE

SPANS.json lists [file, offset, count] in the plan's order (``plan_spans`` writes it). The loop reads each range
from its source file and appends it to OUT_FILE with ``os.copy_file_range``: the same reads, in the same order, as
the writer's byte copies, without the writer's headers, hashing, NaN/Inf checks or read-ahead. What it costs more
than ``cp`` of the output is what the read pattern costs (kept experts spread over the source's shards).
"""

from __future__ import annotations

import json
import os
import sys


def plan_spans(plan) -> list[tuple[str, int, int]]:
    """[file, offset, count] of every byte copy of `plan`, in order (computed tensors are left out)."""
    from surgery.plan.nodes import Copy, Joined, Rows

    spans = []

    def visit(recipe):
        if isinstance(recipe, Copy) and not recipe.quantized:
            offset, count = recipe.byte_span()
            spans.append((str(recipe.checkpoint.info(recipe.name).file), offset, count))
        elif isinstance(recipe, Joined):
            for item in recipe.items:
                visit(item)
        elif isinstance(recipe, Rows):
            info = recipe.checkpoint.info(recipe.name)
            row = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
            spans.extend((str(info.file), info.offset + r * row, row) for r in recipe.rows)

    for tensor in plan.tensors:
        visit(tensor.recipe)
    return spans


def main(spans_path: str, out_path: str) -> None:
    spans = json.loads(open(spans_path).read())
    descriptors = {}
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    position = 0
    for file, offset, count in spans:
        fd = descriptors.get(file)
        if fd is None:
            fd = descriptors[file] = os.open(file, os.O_RDONLY)
        while count:
            copied = os.copy_file_range(fd, out, count, offset, position)
            if not copied:
                raise OSError(f"{file}: ended at {offset}")
            count, offset, position = count - copied, offset + copied, position + copied
    os.close(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
