"""Tensor dtypes: safetensors' names, their sizes, and their torch and numpy counterparts.

safetensors names a dtype ``F32``, ``BF16``, ``F8_E4M3`` ...; torch and numpy have their own names, and
users write ``fp32``, ``bf16``, ``fp16`` on the command line. Every conversion between them is here.
"""

from __future__ import annotations

import numpy as np

from surgery.errors import SurgeryError

# safetensors dtype name -> bytes per element
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
NUMPY_FLOATS = {"F32": "float32", "F16": "float16", "F64": "float64"}  # safetensors dtype -> numpy dtype name

TORCH_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}
DTYPE_ALIASES = {
    "fp32": "F32", "float32": "F32", "f32": "F32",
    "fp16": "F16", "float16": "F16", "f16": "F16", "half": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
}


def set_config_dtype(config: dict, dtype: str | None) -> dict:
    """Record safetensors dtype `dtype` (F32, BF16, F16) as the model's dtype in `config` (transformers 5's
    ``dtype`` key; the 4.x ``torch_dtype`` spelling is dropped so the two never disagree). None: unchanged."""
    if dtype in ("F32", "BF16", "F16"):
        config["dtype"] = TORCH_DTYPE_NAMES[dtype]
        config.pop("torch_dtype", None)
    return config


def torch_dtype(dtype: str):
    import torch  # lazy: only callers that compute with torch pay for importing it

    return getattr(torch, TORCH_DTYPE_NAMES[dtype])


def safetensors_dtype(torch_dtype_value) -> str:
    name = str(torch_dtype_value).removeprefix("torch.")
    for key, value in TORCH_DTYPE_NAMES.items():
        if value == name:
            return key
    raise SurgeryError(f"dtype {name} cannot be stored in safetensors")


def parse_dtype(text: str) -> str:
    key = DTYPE_ALIASES.get(str(text).lower())
    if key is None:
        raise SurgeryError(f"dtype {text!r} is not supported: expected one of fp32, bf16, fp16")
    return key


def raw_numpy(stored: str) -> str:
    """The numpy dtype that holds stored values as they are: the float itself, else raw bits."""
    return NUMPY_FLOATS.get(stored) or {1: "uint8", 2: "uint16"}[DTYPE_SIZES[stored]]


def as_float32(block, stored: str):
    """float32 values of a numpy block of stored values (bfloat16 is the top half of a float32: exact)."""
    if stored == "F32":
        return block
    if stored == "BF16":
        return (block.astype(np.uint32) << 16).view(np.float32)
    if block.dtype.kind == "f":  # F16, F64
        return block.astype(np.float32)
    import torch  # lazy: float8 has no numpy type; only float8 inputs need torch here

    return torch.from_numpy(block).view(torch_dtype(stored)).to(torch.float32).numpy()
