"""Deferred tensors: values that need the written model itself, written into the draft afterwards.

``Filled`` is what a plan's ``fill`` returns for the draft (each Deferred tensor's value and side files
that replace the plan's); ``HeldShard`` is a written shard whose hasher waits before its deferred tensors
(zeros so far) until ``complete`` writes their values in place.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from surgery.io.dtypes import torch_dtype
from surgery.io.file_io import write_all
from surgery.plan.plan import OutputTensor
from surgery.writer.finite_check import FiniteCheck
from surgery.writer.hashing import TailHasher


@dataclass
class Filled:
    """What ``fill`` returns for a draft: the value of every Deferred tensor, and side files that
    replace the plan's (a model card that reports what the fit found)."""

    tensors: dict  # output name -> torch tensor
    extra_files: dict[str, str] = field(default_factory=dict)


@dataclass
class HeldShard:
    """A written shard and its hasher, which has hashed up to the shard's deferred tensors (zeros so far)."""

    path: Path
    hasher: "TailHasher"
    offsets: dict[str, tuple[int, OutputTensor]]  # deferred tensor name -> (file offset, tensor)
    written: set = field(default_factory=set)  # deferred tensors already written (``write``)
    rows_written: dict = field(default_factory=dict)  # tensors written in row blocks: name -> rows so far

    def write(self, name: str, value, checker: FiniteCheck, handle=None, start_row: int | None = None) -> None:
        """Write deferred tensor `name`'s value in place (checked for NaN/Inf, cast to its dtype); with
        `start_row`, `value` is rows start_row... of it (a fill that computes a large tensor in row blocks)."""

        import torch  # lazy: only a plan with deferred tensors (fitted by running a model) gets here

        offset, tensor = self.offsets[name]
        checker.check_value(value, f"output tensor {name!r} ({tensor.recipe.describe()[:120]})")
        whole = start_row is None
        rows = tensor.shape[0] if whole else int(value.shape[0])
        start = 0 if whole else start_row
        if tuple(value.shape) != (tuple(tensor.shape) if whole else (rows, *tensor.shape[1:])) or \
                not 0 <= start <= start + rows <= (tensor.shape[0] if tensor.shape else 1):
            raise AssertionError(f"fill gave {name} shape {list(value.shape)} at row {start}, plan says "
                                 f"{list(tensor.shape)}")
        data = value.detach().to("cpu", torch_dtype(tensor.dtype)).contiguous().reshape(-1)
        row_bytes = math.prod(tensor.shape[1:]) * data.element_size() if tensor.shape else 0
        with open(self.path, "r+b") if handle is None else _kept(handle) as out:
            out.seek(offset + start * row_bytes)
            write_all(out, data.view(torch.uint8).numpy())
        if whole:
            self.written.add(name)
            return
        self.rows_written[name] = self.rows_written.get(name, 0) + rows
        if self.rows_written[name] == tensor.shape[0]:  # every row given once (blocks do not overlap)
            self.written.add(name)

    def complete(self, values: dict, checker: FiniteCheck) -> str:
        """Write each deferred tensor not written yet from `values`; returns the shard's sha256."""
        with open(self.path, "r+b") as handle:
            for name in self.offsets:
                if name in self.written:
                    continue
                if name not in values:
                    raise AssertionError(f"fill gave no value for deferred tensor {name}")
                self.write(name, values[name], checker, handle)
            handle.flush()
            self.hasher.advance(os.fstat(handle.fileno()).st_size, finished=True)
        return self.hasher.result()


@contextmanager
def _kept(handle):
    yield handle
