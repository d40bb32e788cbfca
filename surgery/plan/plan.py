"""Plans: every output tensor with its name, shape, dtype and a recipe from input tensors.

An operation (copy, upcycle, split, merge ...) only builds a ``Plan``; it reads headers, never
weights, so a plan is complete before the first byte of data is touched and ``--dry-run`` is free.
The streaming writer (``surgery.writer``) executes any plan, computing one tensor at a time.
The recipes themselves are the nodes of ``surgery.plan.nodes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from surgery.io.checkpoint import Checkpoint
from surgery.io.dtypes import DTYPE_SIZES
from surgery.plan.nodes import Recipe


@dataclass
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name
    recipe: Recipe

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass
class Plan:
    """Everything an operation will write, known before any weight is read."""

    operation: str
    tensors: list[OutputTensor]
    config: dict | None
    sources: list[Checkpoint]
    side_files: list[Path] = field(default_factory=list)  # copied verbatim (tokenizer ...)
    extra_files: dict[str, str] = field(default_factory=dict)  # name -> text written into the output
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata
    notes: list[str] = field(default_factory=list)  # shown to the user (e.g. exactness broken on purpose)
    rounding: str | None = None  # a low-precision dtype whose rounding of folded factors the plan introduces
    details: dict = field(default_factory=dict)  # what the operation decided (prune: scores, kept experts), in its JSON
    dequantize: bool = False  # widen a quantized source's weights (copy --dtype); else they are kept quantized

    def __post_init__(self):
        seen = set()
        for tensor in self.tensors:
            if tensor.name in seen:
                raise AssertionError(f"plan writes {tensor.name} twice")
            seen.add(tensor.name)

    @property
    def total_bytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)

    @property
    def parameters(self) -> int:
        return sum(math.prod(tensor.shape) for tensor in self.tensors)

    def to_json(self) -> dict:
        return {
            "operation": self.operation,
            "total_bytes": self.total_bytes,
            "parameters": self.parameters,
            "sources": [str(source.path) for source in self.sources],
            "notes": self.notes,
            "config": self.config,
            "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "recipe": t.recipe.describe()}
                        for t in self.tensors],
            "side_files": [path.name for path in self.side_files] + sorted(self.extra_files),
            **self.details,
        }
