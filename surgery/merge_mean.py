"""The weighted mean of one tensor across merged models, computed with numpy in blocks of rows.

``BlockedMean`` is the recipe ``surgery merge`` gives every non-FFN tensor it averages: float32
arithmetic as ``recipes.WeightedMean`` does it, read ``MEAN_BLOCK_BYTES`` of rows at a time per input,
with no torch unless an input is float8. The helpers read a block of stored rows straight into numpy
and widen it to float32.
"""

from __future__ import annotations

from surgery.errors import SurgeryError
from surgery.recipes import Recipe

MEAN_BLOCK_BYTES = 16 * 2**20  # float32 bytes of one block of rows read per input


class BlockedMean(Recipe):
    """sum_i w_i * x_i / sum_i w_i of one tensor name across models, in float32, read in blocks of rows.

    The arithmetic per element is that of ``recipes.WeightedMean`` (x_0 * (w_0/W), then + x_i * (w_i/W)
    in order, every step rounded to float32), done in numpy: a merge of float32/float16 models needs
    no torch at all. Reading row blocks keeps memory at the output tensor plus two blocks.
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

    def compute_rows(self, rows):
        """Rows `rows` of the mean, with compute_array's arithmetic (each row reads only itself)."""
        import numpy as np
        import torch

        total = float(sum(self.weights))
        result = None
        for checkpoint, weight in zip(self.checkpoints, self.weights):
            value = checkpoint.read_rows(self.name, rows).float().numpy()
            factor = np.float32(weight / total)
            if result is None:
                result = np.multiply(value, factor)
            else:
                np.add(result, np.multiply(value, factor), out=result)
        return torch.from_numpy(result)

    def compute_array(self, dtype):
        import math

        import numpy as np

        from surgery.recipes import NUMPY_FLOATS

        shape = tuple(self.checkpoints[0].info(self.name).shape)
        total = float(sum(self.weights))
        factors = [np.float32(weight / total) for weight in self.weights]
        result = np.empty(shape, dtype=np.float32)
        rows = shape[0] if shape else 1
        row_elements = math.prod(shape[1:]) if shape else 1
        flat = result.reshape(rows, row_elements)
        step = max(1, self.block_bytes // (4 * max(row_elements, 1)))
        product = np.empty((min(step, rows), row_elements), dtype=np.float32)
        scratch = {}  # stored dtype -> one reusable block buffer of raw values
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            target = flat[start:stop]
            for index, (checkpoint, factor) in enumerate(zip(self.checkpoints, factors)):
                stored = checkpoint.info(self.name).dtype
                if stored not in scratch:
                    scratch[stored] = np.empty((min(step, rows), row_elements), dtype=_raw_numpy(stored))
                block = scratch[stored][:stop - start]
                _read_rows_into(checkpoint, self.name, start, stop, block)
                value = _as_float32(block, stored)
                if index == 0:
                    np.multiply(value, factor, out=target)
                else:
                    np.multiply(value, factor, out=product[:stop - start])
                    np.add(target, product[:stop - start], out=target)
        return result if dtype == "F32" else result.astype(NUMPY_FLOATS.get(dtype, "float32"))


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
