"""Read-ahead of the writer's inputs: the disk works on the next tensors while this one is written.

``ReadAhead`` advises the kernel (posix_fadvise WILLNEED) of the bytes the next tensors of a shard read (a byte
copy's own range: a pruned fused tensor's kept experts, not its dropped ones), up to ``READ_AHEAD_BYTES``
(environment ``SURGERY_READ_AHEAD_BYTES``; 0 turns it off).
"""

from __future__ import annotations

import os

from surgery.plan.nodes import Copy
from surgery.plan.plan import OutputTensor

READ_AHEAD_BYTES = int(os.environ.get("SURGERY_READ_AHEAD_BYTES", 256 * 2**20))  # 0 turns it off


class ReadAhead:
    """Asks the kernel (posix_fadvise WILLNEED) to start reading the inputs of the next tensors, up to
    READ_AHEAD_BYTES beyond the current one, while this one is copied, computed and written: the disk
    works on the next tensor instead of waiting for the writer to ask for it."""

    def __init__(self, tensors: list[OutputTensor]):
        self.tensors = tensors
        self.advised = 0  # tensors[:advised] have had their inputs advised
        self.ends: list[int] = []  # running total of advised bytes after each advised tensor
        self.enabled = READ_AHEAD_BYTES > 0 and hasattr(os, "posix_fadvise")

    def before(self, position: int) -> None:
        """Called before tensors[position] is written."""
        if not self.enabled:
            return
        done = self.ends[position - 1] if position else 0
        while self.advised < len(self.tensors) and (not self.ends or self.ends[-1] - done < READ_AHEAD_BYTES):
            total = self.ends[-1] if self.ends else 0
            for checkpoint, file, offset, count in _spans(self.tensors[self.advised].recipe):
                try:
                    os.posix_fadvise(checkpoint.descriptor(file), offset, count, os.POSIX_FADV_WILLNEED)
                except OSError:
                    self.enabled = False
                    return
                total += count
            self.ends.append(total)
            self.advised += 1


def _spans(recipe):
    """(checkpoint, file, offset, bytes) of what `recipe` reads: a byte copy's own range (one expert's block of a
    fused tensor, not the whole tensor), else each input tensor whole."""
    if isinstance(recipe, Copy) and recipe.quantized:  # read whole, every part
        for _, part in recipe.checkpoint.info(recipe.name).parts:
            yield recipe.checkpoint, part.file, part.offset, part.nbytes
    elif isinstance(recipe, Copy):
        offset, count = recipe.byte_span()
        yield recipe.checkpoint, recipe.checkpoint.info(recipe.name).file, offset, count
    elif recipe.parts():
        for part in recipe.parts():
            yield from _spans(part)
    else:
        for checkpoint, name in recipe.inputs():
            info = checkpoint.info(name)
            for stored in [part for _, part in info.parts] or [info]:
                yield checkpoint, stored.file, stored.offset, stored.nbytes
