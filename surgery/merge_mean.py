"""The weighted mean of one tensor across merged models, computed with numpy in blocks of rows.

``BlockedMean`` is the recipe ``surgery merge`` gives every non-FFN tensor it averages: float32
arithmetic as ``recipes.WeightedMean`` does it, read ``MEAN_BLOCK_BYTES`` of rows at a time per input and
written a block at a time, with no torch unless an input is float8. The helpers read a block of stored rows
straight into numpy and widen it to float32.
"""

from __future__ import annotations

from surgery.errors import SurgeryError
from surgery.recipes import Recipe

MEAN_BLOCK_BYTES = 16 * 2**20  # float32 bytes of one block of rows read per input


class BlockedMean(Recipe):
    """sum_i w_i * x_i / sum_i w_i of one tensor name across models, in float32, read in blocks of rows.

    The arithmetic per element is that of ``recipes.WeightedMean`` (x_0 * (w_0/W), then + x_i * (w_i/W)
    in order, every step rounded to float32), done in numpy: a merge of float32/float16 models needs
    no torch at all. The writer takes the mean a block of rows at a time (``array_blocks``), so a merge
    holds a few blocks, never the tensor (a 32k x 4096 embedding: 512 MB in float32).
    """

    def __init__(self, checkpoints: list, name: str, weights: list[float], block_bytes: int = MEAN_BLOCK_BYTES):
        self.checkpoints, self.name, self.weights, self.block_bytes = checkpoints, name, weights, block_bytes

    def inputs(self):
        return [(checkpoint, self.name) for checkpoint in self.checkpoints]

    def describe(self):
        return "mean(" + ", ".join(f"{w:g}*{c.label or c.directory}" for w, c in zip(self.weights, self.checkpoints)) + ")"

    def numpy_ready(self, dtype):
        from surgery.recipes import NUMPY_FLOATS

        stored = {checkpoint.info(self.name).dtype for checkpoint in self.checkpoints}
        return dtype in NUMPY_FLOATS and stored <= {*NUMPY_FLOATS, "BF16"}  # float8 needs torch (_as_float32)

    def compute(self):
        import torch

        return torch.from_numpy(self.compute_array("F32"))

    def factors(self) -> list:
        """Each model's factor: a float32 scalar w_i / sum w, or (``TokenWeightedMean``) one per row."""
        import numpy as np

        total = float(sum(self.weights))
        return [np.float32(weight / total) for weight in self.weights]

    def compute_rows(self, rows):
        """Rows `rows` of the mean, with compute_array's arithmetic (each row reads only itself)."""
        import numpy as np
        import torch

        result = None
        for checkpoint, factor in zip(self.checkpoints, self.factors()):
            value = checkpoint.read_rows(self.name, rows).float().numpy()
            factor = factor if np.ndim(factor) == 0 else factor[np.asarray(list(rows), dtype=np.int64), None]
            if result is None:
                result = np.multiply(value, factor)
            else:
                np.add(result, np.multiply(value, factor), out=result)
        return torch.from_numpy(result)

    def compute_array(self, dtype):
        import numpy as np

        from surgery.recipes import NUMPY_FLOATS

        shape = tuple(self.checkpoints[0].info(self.name).shape)
        result = np.empty(shape, dtype=NUMPY_FLOATS.get(dtype, "float32"))
        flat, start = result.reshape(shape[0] if shape else 1, -1), 0
        for block in self.array_blocks(dtype):
            flat[start:start + len(block)] = block
            start += len(block)
        return result

    def array_blocks(self, dtype):
        """The mean `block_bytes` of float32 rows at a time, in `dtype`: one reused block buffer (and one per
        stored dtype for the raw values read), never the whole tensor."""
        import math

        import numpy as np

        from surgery.recipes import NUMPY_FLOATS

        shape = tuple(self.checkpoints[0].info(self.name).shape)
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
            for index, (checkpoint, factor) in enumerate(zip(self.checkpoints, factors)):
                stored = checkpoint.info(self.name).dtype
                if stored not in scratch:
                    scratch[stored] = np.empty((min(step, rows), row_elements), dtype=_raw_numpy(stored))
                block = scratch[stored][:stop - start]
                _read_rows_into(checkpoint, self.name, start, stop, block)
                value = _as_float32(block, stored)
                factor = factor if np.ndim(factor) == 0 else factor[start:stop, None]
                if index == 0:
                    np.multiply(value, factor, out=target)
                else:
                    np.multiply(value, factor, out=product[:stop - start])
                    np.add(target, product[:stop - start], out=target)
            yield target if dtype == "F32" else target.astype(NUMPY_FLOATS.get(dtype, "float32"))


class TokenWeightedMean(BlockedMean):
    """RegMean of an embedding (``--non-ffn regmean``/``regmean++``): the embedding is a linear layer on one-hot
    inputs, so model i's Gram matrix is diagonal, its token counts c_i on its calibration text, and RegMean's
    merge is each row's mean weighted by w_i c_i(t) / sum_j w_j c_j(t); a row no text uses keeps the plain
    weighted mean. The counts are known once the texts are tokenized (``set_counts``), before any weight is
    read; the arithmetic is ``BlockedMean``'s with one factor per row."""

    def __init__(self, checkpoints: list, name: str, weights: list[float], block_bytes: int = MEAN_BLOCK_BYTES):
        super().__init__(checkpoints, name, weights, block_bytes)
        self.counts = None  # per model: float64 [vocab] token counts

    def describe(self):
        return "rows weighted by token counts (" + super().describe() + ")"

    def set_counts(self, counts: list) -> None:
        self.counts = counts

    def factors(self) -> list:
        import numpy as np

        if self.counts is None:
            raise AssertionError(f"{self.name}: token counts are set before the write (set_counts)")
        weighted = [weight * count.astype(np.float64) for weight, count in zip(self.weights, self.counts)]
        total = sum(weighted)
        plain = [weight / float(sum(self.weights)) for weight in self.weights]
        return [np.where(total > 0, w / np.where(total > 0, total, 1.0), p).astype(np.float32)
                for w, p in zip(weighted, plain)]


def _raw_numpy(stored: str) -> str:
    """The numpy dtype that holds stored values as they are: the float itself, else raw bits."""
    from surgery.recipes import NUMPY_FLOATS
    from surgery.safetensors_format import DTYPE_SIZES

    return NUMPY_FLOATS.get(stored) or {1: "uint8", 2: "uint16"}[DTYPE_SIZES[stored]]


def _as_float32(block, stored: str):
    """float32 values of a block of stored values (bfloat16 is the top half of a float32: exact)."""
    import numpy as np

    if stored == "F32":
        return block
    if stored == "BF16":
        return (block.astype(np.uint32) << 16).view(np.float32)
    if block.dtype.kind == "f":  # F16, F64
        return block.astype(np.float32)
    import torch  # float8: numpy has no such type

    from surgery.checkpoint import torch_dtype

    return torch.from_numpy(block).view(torch_dtype(stored)).to(torch.float32).numpy()


def _read_rows_into(checkpoint, name: str, start: int, stop: int, out) -> None:
    """Rows start:stop of a stored tensor, read with positioned reads straight into numpy array `out`."""
    from surgery.safetensors_format import pread_into

    info = checkpoint.info(name)
    rows = info.shape[0] if info.shape else 1
    if not 0 <= start <= stop <= rows or out.nbytes * rows != info.nbytes * (stop - start):
        raise SurgeryError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, cannot read rows {start}:{stop}")
    row_bytes = info.nbytes // rows if rows else 0
    if out.nbytes:
        pread_into(checkpoint._fd(info.file), memoryview(out).cast("B"), info.offset + row_bytes * start, info.file, name)
