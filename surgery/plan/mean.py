"""The one weighted mean of surgery: a plan node averaging tensors of several checkpoints (or parts of them).

A merge's non-FFN tensors, an extract's averaged experts and add-experts' ``--non-ffn average`` are all this
node; ``set_row_counts`` makes it RegMean's merge of an embedding (rows weighted by token counts).
"""

from __future__ import annotations

import math

import numpy as np

from surgery.io.dtypes import NUMPY_FLOATS, as_float32, raw_numpy
from surgery.plan.nodes import Copy, Recipe

MEAN_BLOCK_BYTES = 16 * 2**20  # float32 bytes of one block of rows, read per input


class WeightedMean(Recipe):
    """sum_i w_i * x_i / sum_i w_i of the `items` (tensors of one shape), computed in float32: the one weighted
    mean of surgery (a merge's non-FFN tensors, an extract's averaged experts, add-experts' --non-ffn average).

    Arithmetic: x_0 * (w_0/W), then + x_i * (w_i/W) in order, each product and each sum rounded to float32 once
    (no fused multiply-add). Where every item is a stored tensor numpy can read (float16/32/64, bfloat16), the
    mean is computed with numpy ``block_bytes`` of float32 rows at a time (``array_blocks``): the writer holds a
    few blocks, never the tensor (a 32k x 4096 embedding: 512 MB in float32), and needs no torch; otherwise with
    torch (``compute_with_torch``), the same arithmetic. ``per_row``: each model's weight is also scaled, row by
    row, by its count of that row's token (``set_row_counts``: RegMean of an embedding, whose one-hot inputs have
    a diagonal Gram matrix); a row no model counts keeps the plain weights."""

    def __init__(self, items: list[Recipe], weights: list[float], *, per_row: bool = False,
                 block_bytes: int = MEAN_BLOCK_BYTES):
        self.items, self.weights, self.per_row, self.block_bytes = list(items), list(weights), per_row, block_bytes
        self.row_counts = None  # per model: float64 [rows] token counts (per_row)

    def parts(self):
        return list(self.items)

    def describe(self):
        whole = len({getattr(item, "name", None) for item in self.items}) == 1 and all(
            isinstance(item, Copy) and item.rows is None for item in self.items)
        named = [(item.checkpoint.label or str(item.checkpoint.directory)) if whole else item.describe()
                 for item in self.items]
        text = "mean(" + ", ".join(f"{w:g}*{name}" for w, name in zip(self.weights, named)) + ")"
        return f"rows weighted by token counts ({text})" if self.per_row else text

    def set_row_counts(self, counts: list) -> None:
        self.row_counts = counts

    def factors(self) -> list:
        """Each model's factor: a float32 scalar w_i / sum w, or (per_row) one per row."""
        if not self.per_row:
            total = float(sum(self.weights))
            return [np.float32(weight / total) for weight in self.weights]
        if self.row_counts is None:
            raise AssertionError("a per-row mean is given its token counts before the write (set_row_counts)")
        weighted = [weight * count.astype(np.float64) for weight, count in zip(self.weights, self.row_counts)]
        total = sum(weighted)
        plain = [weight / float(sum(self.weights)) for weight in self.weights]
        return [np.where(total > 0, w / np.where(total > 0, total, 1.0), p).astype(np.float32)
                for w, p in zip(weighted, plain)]

    def _stored(self) -> list[str] | None:
        """The stored dtype of every item when each is a stored tensor numpy reads, else None."""
        if not all(isinstance(item, Copy) and not item.quantized for item in self.items):
            return None  # a computed or quantized item needs torch
        stored = [item.stored_dtype() for item in self.items]
        return stored if set(stored) <= {*NUMPY_FLOATS, "BF16"} else None  # float8 needs torch (as_float32)

    def numpy_ready(self, dtype):
        return dtype in NUMPY_FLOATS and self._stored() is not None

    def compute(self):
        import torch  # lazy: a numpy-readable mean is written without torch

        if self._stored() is None:
            return self.compute_with_torch()
        return torch.from_numpy(self.compute_array("F32"))

    def compute_with_torch(self):
        """The mean of the items' computed values, with torch: what ``compute`` is where numpy cannot read them."""
        import torch  # lazy: a numpy-readable mean is written without torch

        result = None
        for factor, item in zip(self.factors(), self.items):
            value = item.compute().to(torch.float32)
            if np.ndim(factor):
                value = value * torch.from_numpy(factor).reshape(-1, *([1] * (value.dim() - 1)))
            else:
                value = value * float(factor)
            result = value if result is None else result.add_(value)
        return result

    def compute_rows(self, rows):
        """Rows `rows` of the mean, with the same arithmetic (each row reads only itself)."""
        import torch  # lazy: a numpy-readable mean is written without torch

        if self._stored() is None:
            return super().compute_rows(rows)
        result = None
        for item, factor in zip(self.items, self.factors()):
            value = item.compute_rows(rows).float().numpy()
            factor = factor if np.ndim(factor) == 0 else factor[np.asarray(list(rows), dtype=np.int64), None]
            if result is None:
                result = np.multiply(value, factor)
            else:
                np.add(result, np.multiply(value, factor), out=result)
        return torch.from_numpy(result)

    def compute_array(self, dtype):
        shape = tuple(self.items[0].stored_shape())
        result = np.empty(shape, dtype=NUMPY_FLOATS.get(dtype, "float32"))
        flat, start = result.reshape(shape[0] if shape else 1, -1), 0
        for block in self.array_blocks(dtype):
            flat[start:start + len(block)] = block
            start += len(block)
        return result

    def array_blocks(self, dtype):
        """The mean `block_bytes` of float32 rows at a time, in `dtype`: one reused block buffer (and one per
        stored dtype for the raw values read), never the whole tensor."""
        shape = tuple(self.items[0].stored_shape())
        stored = self._stored()
        factors = self.factors()
        rows = shape[0] if shape else 1
        row_elements = math.prod(shape[1:]) if shape else 1
        step = max(1, self.block_bytes // (4 * max(row_elements, 1)))
        target_buffer = np.empty((min(step, rows), row_elements), dtype=np.float32)
        product = np.empty_like(target_buffer)
        scratch = {}  # stored dtype -> one reusable block buffer of raw values
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            target = target_buffer[:stop - start]
            for index, (item, kind, factor) in enumerate(zip(self.items, stored, factors)):
                if kind not in scratch:
                    scratch[kind] = np.empty((min(step, rows), row_elements), dtype=raw_numpy(kind))
                block = scratch[kind][:stop - start]
                item.read_rows_into(start, stop, block)
                value = as_float32(block, kind)
                factor = factor if np.ndim(factor) == 0 else factor[start:stop, None]
                if index == 0:
                    np.multiply(value, factor, out=target)
                else:
                    np.multiply(value, factor, out=product[:stop - start])
                    np.add(target, product[:stop - start], out=target)
            yield target if dtype == "F32" else target.astype(NUMPY_FLOATS.get(dtype, "float32"))
