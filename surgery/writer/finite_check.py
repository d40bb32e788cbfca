"""The writer's NaN/Inf refusal: floating-point inputs and results that are not finite are not written.

``FiniteCheck`` applies the one check (``surgery.io.finite``) to raw little-endian bytes (a plain copy needs
no torch) and to computed values, each input tensor once; ``checking_output`` wraps the check of a computed
tensor so that a failure names the input file and tensor that hold such values, when one does.
"""

from __future__ import annotations

from contextlib import contextmanager

from surgery.errors import SurgeryError
from surgery.io.dtypes import FLOAT_DTYPES
from surgery.io.file_io import pread_exact
from surgery.io.finite import nonfinite_bytes, nonfinite_counts
from surgery.plan.plan import OutputTensor


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
        if self.enabled:
            _refuse(nonfinite_counts(value), where)

    def check_bytes(self, data, dtype: str, where: str) -> None:
        if self.enabled:
            _refuse(nonfinite_bytes(data, dtype), where)


def _refuse(found: tuple[int, int] | None, where: str) -> None:
    if found is not None:
        nan, inf = found
        raise SurgeryError(f"{where} has {nan} NaN and {inf} Inf values; refusing to write "
                           "(pass --allow-nonfinite to write it anyway)")


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
    for checkpoint, name in tensor.recipe.inputs():
        info = checkpoint.info(name)
        if info.parts:  # a quantized weight: its dequantized value
            checker.check_value(checkpoint.read(name), f"{info.file}: tensor {name!r}")
        elif info.dtype in FLOAT_DTYPES:
            data = pread_exact(checkpoint.descriptor(info.file), info.nbytes, info.offset, info.file, name)
            checker.check_bytes(data, info.dtype, f"{info.file}: tensor {name!r}")
