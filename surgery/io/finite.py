"""The writer's NaN/Inf check: floating-point inputs and results that are not finite are refused.

``FiniteCheck`` checks raw little-endian bytes with numpy (a plain copy needs no torch) and computed
torch values, each input tensor once; ``checking_output`` wraps the check of a computed tensor so that a
failure names the input file and tensor that hold such values, when one does.
"""

from __future__ import annotations

from contextlib import contextmanager

from surgery.errors import SurgeryError
from surgery.plan import OutputTensor
from surgery.safetensors_format import FLOAT_DTYPES


class FiniteCheck:
    """Refuses NaN/Inf in floating-point inputs and results, checking each input tensor once."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.checked: set = set()

    def needed(self, checkpoint, name: str) -> bool:
        key = (id(checkpoint), name)
        return self.enabled and checkpoint.info(name).dtype in FLOAT_DTYPES and key not in self.checked

    def done(self, checkpoint, name: str) -> None:
        self.checked.add((id(checkpoint), name))

    def check_value(self, value, where: str) -> None:
        import torch

        if self.enabled and value.is_floating_point() and value.numel() and not _finite_sum(value):
            if not bool(torch.isfinite(value).all()):  # the sum may overflow on finite data: count exactly
                nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
                raise SurgeryError(f"{where} has {nan} NaN and {inf} Inf values; refusing to write "
                                   "(pass --allow-nonfinite to write it anyway)")

    def check_bytes(self, data, dtype: str, where: str) -> None:
        """The same check on raw little-endian bytes, with numpy (no torch import for plain copies)."""
        import numpy as np

        if not self.enabled:
            return
        if dtype in ("F32", "F64"):
            values = np.frombuffer(data, dtype=np.float32 if dtype == "F32" else np.float64)
            with np.errstate(all="ignore"):  # NaN/Inf propagate through the sum; an overflow is recounted
                if np.isfinite(values.sum()):
                    return
            nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        else:  # F16 / BF16: exponent bits all ones means Inf or NaN
            bits = np.frombuffer(data, dtype=np.uint16)
            exponent, mantissa = (0x7C00, 0x03FF) if dtype == "F16" else (0x7F80, 0x007F)
            special = (bits & exponent) == exponent
            if not special.any():
                return
            nan = int((special & ((bits & mantissa) != 0)).sum())
            inf = int(special.sum()) - nan
        if nan or inf:
            raise SurgeryError(f"{where} has {nan} NaN and {inf} Inf values; refusing to write "
                               "(pass --allow-nonfinite to write it anyway)")


def _finite_sum(value) -> bool:
    """Whether the sum of `value`, in its own dtype, is finite. NaN and Inf propagate through a sum, so
    a finite sum proves every element finite; a sum that overflows on finite data is recounted exactly
    by the caller. Summing in the tensor's own dtype needs no temporary copy (a float64 sum of a
    float32 tensor is over 20 times slower)."""
    import math

    return math.isfinite(float(value.sum()))


@contextmanager
def checking_output(tensor: OutputTensor, checker: FiniteCheck):
    """Around the NaN/Inf check of a computed tensor: yields how to name it, and when the check
    fails, names the source file and tensor instead if an input is the cause."""
    try:
        yield f"output tensor {tensor.name!r} ({tensor.recipe.describe()[:120]})"
    except SurgeryError:
        _blame_input(tensor, checker)
        raise


def _blame_input(tensor: OutputTensor, checker: FiniteCheck) -> None:
    """Raise the NaN/Inf error for the first input of `tensor` that holds such values, if any."""
    from surgery.safetensors_format import pread_exact

    for checkpoint, name in tensor.recipe.inputs():
        info = checkpoint.info(name)
        if info.dtype in FLOAT_DTYPES:
            data = pread_exact(checkpoint._fd(info.file), info.nbytes, info.offset, info.file, name)
            checker.check_bytes(data, info.dtype, f"{info.file}: tensor {name!r}")
