"""The node kinds of a plan: how each output tensor is computed from input tensors.

Every kind is here. Nodes are small and composable. ``Copy`` of a tensor whose dtype does not change is
copied byte for byte by the writer (any dtype, F8 included); every other node computes a torch tensor
(or, where ``numpy_ready``, numpy arrays, so that the writer need not import torch; the weighted mean,
``surgery.plan.mean``, is one). ``Lazy`` is a value
computed on first use; ``Deferred`` marks a tensor whose value the writer asks for once the rest of the
output is written (its ``slot`` says which fitted value it is, for the operation that fills it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from surgery.errors import SurgeryError
from surgery.io.checkpoint import Checkpoint
from surgery.io.dtypes import NUMPY_FLOATS, torch_dtype
from surgery.io.file_io import pread_exact, pread_into


class Recipe:
    """How to compute one output tensor. Subclasses say what they read and how they combine it."""

    def inputs(self) -> list[tuple[Checkpoint, str]]:
        return [pair for part in self.parts() for pair in part.inputs()]

    def parts(self) -> list["Recipe"]:
        return []

    def describe(self) -> str:
        raise NotImplementedError

    def compute(self):
        raise NotImplementedError

    def compute_rows(self, rows):
        """Rows `rows` (first dimension) of this tensor; recipes that can read only those rows do so."""
        import torch  # lazy: copies and numpy-computed tensors are written without torch

        return self.compute()[torch.as_tensor(list(rows), dtype=torch.long)]

    def numpy_ready(self, dtype: str) -> bool:
        """Whether `compute_array` can make this tensor in safetensors dtype `dtype` with numpy alone, so
        the writer need not import torch (about 2 s) for it. Known from headers, before any data is read."""
        return False

    def compute_array(self, dtype: str):
        """This tensor as a numpy array of safetensors dtype `dtype`; only where `numpy_ready(dtype)`."""
        raise NotImplementedError

    def array_blocks(self, dtype: str):
        """This tensor as numpy arrays of consecutive rows, in order (what the writer writes; only where
        `numpy_ready(dtype)`). One block, the whole tensor, unless the recipe computes it block by block, so
        the writer holds a block and never the tensor. A block may be a buffer reused for the next one."""
        yield self.compute_array(dtype)


def _short(checkpoint: Checkpoint, name: str) -> str:
    return f"{checkpoint.label}:{name}" if getattr(checkpoint, "label", None) else name


@dataclass
class Copy(Recipe):
    """A stored tensor as it is; with `rows` (a, b), rows a:b of it viewed as 2-D [all but the last dimension,
    last dimension]: a contiguous byte range, e.g. one expert's gate rows in a fused [E, 2I, H] tensor."""

    checkpoint: Checkpoint
    name: str
    rows: tuple[int, int] | None = None

    def inputs(self):
        return [(self.checkpoint, self.name)]

    def describe(self):
        part = "" if self.rows is None else f"[rows {self.rows[0]}:{self.rows[1]}]"
        return f"copy {_short(self.checkpoint, self.name)}{part}"

    @property
    def quantized(self) -> bool:
        """Whether the tensor is a quantized weight (``surgery.io.quantized``): read dequantized, never as bytes."""
        return bool(self.checkpoint.info(self.name).parts)

    def stored_shape(self) -> tuple[int, ...]:
        """Shape of what this recipe copies (a block of rows is 2-D)."""
        shape = tuple(self.checkpoint.info(self.name).shape)
        return shape if self.rows is None else (self.rows[1] - self.rows[0], shape[-1])

    def byte_span(self) -> tuple[int, int]:
        """(file offset, byte count) of what this recipe copies."""
        info = self.checkpoint.info(self.name)
        if info.parts:
            raise AssertionError(f"{self.name} is a {info.scheme} weight: it has no single byte range")
        if self.rows is None:
            return info.offset, info.nbytes
        shape = tuple(info.shape)
        flat_rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        row_bytes = info.nbytes // flat_rows if flat_rows else 0
        start, stop = self.rows
        if not 0 <= start <= stop <= flat_rows:
            raise SurgeryError(f"{info.file}: tensor {self.name!r} has shape {list(shape)}; cannot take rows "
                               f"{start}:{stop} of its {flat_rows} rows")
        return info.offset + start * row_bytes, (stop - start) * row_bytes

    def compute(self):
        if self.rows is None:
            return self.checkpoint.read(self.name)
        import torch  # lazy: copies and numpy-computed tensors are written without torch

        info = self.checkpoint.info(self.name)
        if info.parts:  # dequantized whole, then the block of rows
            return self.checkpoint.read(self.name).reshape(-1, info.shape[-1])[self.rows[0]:self.rows[1]]
        offset, count = self.byte_span()
        data = pread_exact(self.checkpoint.descriptor(info.file), count, offset, info.file, self.name)
        shape = self.stored_shape()
        if not count:
            return torch.empty(shape, dtype=torch_dtype(info.dtype))
        return torch.frombuffer(data, dtype=torch_dtype(info.dtype)).reshape(shape)

    def compute_rows(self, rows):
        if self.rows is not None:
            return super().compute_rows(rows)
        return self.checkpoint.read_rows(self.name, rows)

    def stored_dtype(self) -> str:
        return self.checkpoint.info(self.name).dtype

    def read_rows_into(self, start: int, stop: int, out) -> None:
        """Rows start:stop of what this recipe copies (a block of rows: rows of the block) into numpy array `out`,
        raw stored values, with positioned reads."""
        if self.rows is None:
            self.checkpoint.read_rows_into(self.name, start, stop, out)
            return
        info = self.checkpoint.info(self.name)
        offset, count = self.byte_span()  # refuses a quantized weight
        total = self.rows[1] - self.rows[0]
        row_bytes = count // total if total else 0
        if not 0 <= start <= stop <= total or out.nbytes != row_bytes * (stop - start):
            raise SurgeryError(f"{info.file}: tensor {self.name!r}: cannot read rows {start}:{stop} of its rows "
                               f"{self.rows[0]}:{self.rows[1]}")
        if out.nbytes:
            pread_into(self.checkpoint.descriptor(info.file), memoryview(out).cast("B"), offset + row_bytes * start,
                       info.file, self.name)


@dataclass
class Joined(Recipe):
    """The parts' values back to back, as one tensor of `shape`: stacking along a new first dimension, or
    concatenating along the first, lays the bytes out this way (a fused [E, 2I, H] is expert 0's gate
    rows, its up rows, expert 1's ...). The writer writes part after part (byte copies stay kernel
    copies), so the whole tensor is never in memory."""

    items: list[Recipe]
    shape: tuple[int, ...]

    def parts(self):
        return list(self.items)

    def describe(self):
        if not self.items:
            return "joined()"
        return f"joined({len(self.items)}: {self.items[0].describe()}, ...)"

    def compute(self):
        import torch  # lazy: copies and numpy-computed tensors are written without torch

        return torch.cat([item.compute().reshape(-1) for item in self.items]).reshape(self.shape)


@dataclass
class Rows(Recipe):
    """Rows `rows` (in that order) of an input tensor; only those rows are read."""

    checkpoint: Checkpoint
    name: str
    rows: list[int]

    def inputs(self):
        return [(self.checkpoint, self.name)]

    def describe(self):
        return f"rows[{_index_text(self.rows)}] of {_short(self.checkpoint, self.name)}"

    def compute(self):
        return self.checkpoint.read_rows(self.name, self.rows)


@dataclass
class Columns(Recipe):
    """Columns `columns` (last dimension, in that order) of an input tensor."""

    checkpoint: Checkpoint
    name: str
    columns: list[int]

    def inputs(self):
        return [(self.checkpoint, self.name)]

    def describe(self):
        return f"cols[{_index_text(self.columns)}] of {_short(self.checkpoint, self.name)}"

    def compute(self):
        import torch  # lazy: copies and numpy-computed tensors are written without torch

        tensor = self.checkpoint.read(self.name)
        return tensor.index_select(-1, torch.as_tensor(list(self.columns), dtype=torch.long)).contiguous()


@dataclass
class Concat(Recipe):
    items: list[Recipe]
    dim: int = 0

    def parts(self):
        return list(self.items)

    def describe(self):
        return "concat(" + ", ".join(item.describe() for item in self.items) + f"; dim={self.dim})"

    def compute(self):
        import torch  # lazy: copies and numpy-computed tensors are written without torch

        return torch.cat([item.compute() for item in self.items], dim=self.dim)


@dataclass
class Scale(Recipe):
    item: Recipe
    factor: float

    def parts(self):
        return [self.item]

    def describe(self):
        return f"{self.factor:g} * {self.item.describe()}"

    def compute(self):
        import torch  # lazy: copies and numpy-computed tensors are written without torch

        value = self.item.compute()
        return (value.to(torch.float32) * self.factor).to(value.dtype) if value.dtype != torch.float64 else value * self.factor


@dataclass
class PadRows(Recipe):
    """Append zero rows (dim 0) or zero columns (dim -1) up to `size`: zero neurons add nothing."""

    item: Recipe
    size: int
    dim: int = 0

    def parts(self):
        return [self.item]

    def describe(self):
        return f"pad({self.item.describe()} to {self.size} along dim {self.dim})"

    def compute(self):
        import torch  # lazy: copies and numpy-computed tensors are written without torch

        value = self.item.compute()
        missing = self.size - value.shape[self.dim]
        if missing <= 0:
            return value
        shape = list(value.shape)
        shape[self.dim] = missing
        return torch.cat([value, torch.zeros(shape, dtype=value.dtype)], dim=self.dim)


@dataclass
class Init(Recipe):
    """A fresh tensor: zeros, normal(0, std) or uniform(-bound, bound), seeded for determinism."""

    kind: str
    shape: tuple[int, ...]
    seed: int = 0
    std: float = 0.02
    bound: float | None = None

    def describe(self):
        if self.kind == "normal":
            return f"init normal(0, {self.std:g}) seed {self.seed}"
        if self.kind == "uniform":
            return f"init uniform(+-{self._bound():g}) seed {self.seed}"
        return f"init {self.kind}"

    def _bound(self):
        return self.bound if self.bound is not None else 1.0 / math.sqrt(self.shape[-1])

    def _values(self):
        """float32 values from numpy's seeded generator: the same numbers whichever path writes them."""
        if self.kind == "zero":
            return np.zeros(self.shape, dtype=np.float32)
        if self.kind == "ones":
            return np.ones(self.shape, dtype=np.float32)
        generator = np.random.default_rng(int(self.seed))
        if self.kind == "normal":
            return generator.standard_normal(self.shape, dtype=np.float32) * np.float32(self.std)
        if self.kind == "uniform":
            return (generator.random(self.shape, dtype=np.float32) * 2 - 1) * np.float32(self._bound())
        raise SurgeryError(f"unknown init {self.kind!r} (expected zero, normal, uniform)")

    def compute(self):
        import torch  # lazy: copies and numpy-computed tensors are written without torch

        return torch.from_numpy(self._values())

    def numpy_ready(self, dtype):
        return dtype in NUMPY_FLOATS and self.kind in ("zero", "ones", "normal", "uniform")

    def compute_array(self, dtype):
        return self._values().astype(NUMPY_FLOATS[dtype], copy=False)


@dataclass
class Constant(Recipe):
    """A small tensor computed before writing (e.g. router rows fitted on calibration data)."""

    tensor: object
    text: str = "computed"

    def describe(self):
        return self.text

    def compute(self):
        return self.tensor.clone()


class Lazy(Recipe):
    """A value computed on first use, by `make` (a dry run never calls it): e.g. router rows from the embedding
    rows of calibration tokens. `make` returns a torch tensor."""

    def __init__(self, text: str, make: Callable):
        self.text, self._make = text, make

    def describe(self):
        return self.text

    def compute(self):
        return self._make().clone()


@dataclass(frozen=True)
class RouterSlot:
    """What a Deferred router tensor is: the rows of layer `layer`'s router (or, kind "shared_gate", of its
    shared expert's gate), fitted on the written draft."""

    layer: int
    kind: str = "router"


class Deferred(Recipe):
    """A tensor whose value exists only once the rest of the output is written (a router fitted by running
    the written model): the writer places it last in its shard, writes the rest, calls the plan's
    ``fill`` with the draft directory, and writes the value then (``surgery.writer.stream.write_plan``).
    `slot`: what the fill computes for it (the operation's own description: a layer's router, a RegMean
    weight ...)."""

    def __init__(self, text: str, slot=None):
        self.text = text
        self.slot = slot

    def describe(self):
        return self.text

    def compute(self):
        raise AssertionError(f"deferred tensor ({self.text}) computed before the draft was filled")


@dataclass
class Apply(Recipe):
    """fn(*inputs): for transformations that are specific to one operation (noise, re-init ...)."""

    items: list[Recipe]
    fn: Callable
    text: str

    def parts(self):
        return list(self.items)

    def describe(self):
        return f"{self.text}(" + ", ".join(item.describe() for item in self.items) + ")"

    def compute(self):
        return self.fn(*[item.compute() for item in self.items])


def _index_text(indices) -> str:
    indices = list(indices)
    if indices and indices == list(range(indices[0], indices[0] + len(indices))):
        return f"{indices[0]}:{indices[-1] + 1}"
    head = ",".join(str(i) for i in indices[:4])
    return f"{head},... ({len(indices)})" if len(indices) > 4 else head
