"""The one NaN/Inf check: of a torch tensor, a numpy array, or raw little-endian bytes.

A sum in the values' own dtype is finite unless a value is NaN or Inf or the sum overflows: one read and
no mask, far cheaper than testing every element (a float64 sum of float32 values is over 20 times slower,
a float32 sum of bfloat16 ones about 4 times). Only a non-finite sum is counted element by element, which
also tells an overflow on finite values from a real NaN/Inf. Callers say what they refuse, and how.
"""

from __future__ import annotations

import math

import numpy as np

# safetensors 16-bit float dtype -> (exponent bits, mantissa bits): exponent all ones is Inf or NaN
_HALF_BITS = {"F16": (0x7C00, 0x03FF), "BF16": (0x7F80, 0x007F)}


def nonfinite_counts(value) -> tuple[int, int] | None:
    """(NaN count, Inf count) of a floating torch tensor or numpy array, or None when every value is finite
    (also for an empty or non-floating one)."""
    if hasattr(value, "is_floating_point"):  # torch
        if not value.is_floating_point() or not value.numel() or math.isfinite(float(value.sum())):
            return None
        import torch  # lazy: a torch value means torch is loaded already

        if bool(torch.isfinite(value).all()):
            return None
        return int(torch.isnan(value).sum()), int(torch.isinf(value).sum())

    if value.dtype.kind != "f" or not value.size:
        return None
    with np.errstate(all="ignore"):  # NaN/Inf propagate through the sum; an overflow is recounted
        if np.isfinite(value.sum()):
            return None
    nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
    return (nan, inf) if nan or inf else None


def nonfinite_bytes(data, dtype: str) -> tuple[int, int] | None:
    """The same for raw little-endian bytes of safetensors dtype `dtype` (F32, F64, F16, BF16), with numpy
    alone: a plain copy needs no torch."""
    if dtype in ("F32", "F64"):
        return nonfinite_counts(np.frombuffer(data, dtype=np.float32 if dtype == "F32" else np.float64))
    exponent, mantissa = _HALF_BITS[dtype]
    bits = np.frombuffer(data, dtype=np.uint16)
    special = (bits & exponent) == exponent
    if not special.any():
        return None
    nan = int((special & ((bits & mantissa) != 0)).sum())
    return nan, int(special.sum()) - nan
