"""Quantized checkpoints read as the model they encode.

A checkpoint whose config.json holds a ``quantization_config`` stores some weights as several tensors: an FP8
weight and its block scales (``fp8``), MXFP4 blocks and exponents (``mxfp4``). ``view`` groups them: each quantized
weight becomes one *logical* tensor (a ``TensorInfo`` with ``scheme`` and ``parts``) under the name and shape the
unquantized model gives it, so the families' tables, plans and the layer runner see the model, and every part is
checked against its scheme's rules from the headers alone. Reading a logical tensor dequantizes it
(``Scheme.dequantize_parts``); a plan that copies it is written as its parts, byte for byte (``surgery.plan.quantized``).

Each scheme is one module holding a ``Scheme`` subclass; ``SCHEMES`` lists them by ``quant_method``, ``REFUSED``
the methods that are read by no scheme, each with why.
"""

from __future__ import annotations

from pathlib import Path

from surgery.errors import SurgeryError
from surgery.io.quantized.compressed import CompressedTensors
from surgery.io.quantized.fp8 import BlockFP8
from surgery.io.quantized.mxfp4 import MXFP4
from surgery.io.quantized.scheme import Scheme, logical_dtype
from surgery.io.safetensors_format import TensorInfo

SCHEMES: dict[str, type[Scheme]] = {scheme.method: scheme for scheme in (BlockFP8, MXFP4, CompressedTensors)}

# quant_method -> what it is; refused with one line naming it
REFUSED = {
    "gptq": "GPTQ (packed INT4/INT8 with group scales and g_idx)",
    "awq": "AWQ (packed INT4 with group scales and zero points)",
    "bitsandbytes": "bitsandbytes (NF4/FP4/INT8 quantized when loaded)",
    "aqlm": "AQLM (additive codebooks)",
    "quanto": "optimum-quanto",
    "eetq": "EETQ (INT8)",
    "hqq": "HQQ",
    "fbgemm_fp8": "FBGEMM FP8 (per-channel FP8)",
    "torchao": "torchao (tensor subclasses)",
    "bitnet": "BitNet (ternary weights)",
    "vptq": "VPTQ (vector quantization)",
    "higgs": "HIGGS",
    "spqr": "SpQR",
    "quark": "AMD Quark",
    "auto-round": "AutoRound",
    "fp_quant": "FP-Quant",
    "gguf": "GGUF",
}
READ = ("surgery reads fp8 (block-scaled FP8, weight_scale_inv), mxfp4 (gpt-oss's *_blocks / *_scales) and "
        "compressed-tensors (llm-compressor's formats)")


def scheme_of(config: dict | None, where: Path) -> Scheme | None:
    """The scheme of a config's ``quantization_config`` (None: not quantized); one line refusing any other."""
    quantization = (config or {}).get("quantization_config")
    if quantization is None:
        return None
    if not isinstance(quantization, dict):
        raise SurgeryError(f"{where}: quantization_config must be an object, found {type(quantization).__name__}")
    method = quantization.get("quant_method")
    if method in SCHEMES:
        return SCHEMES[method](quantization, where)
    if method in REFUSED:
        raise SurgeryError(f"{where}: quant_method {method!r} ({REFUSED[method]}) is not read; {READ}")
    raise SurgeryError(f"{where}: unknown quant_method {method!r} in quantization_config; {READ}")


def view(scheme: Scheme, config: dict, tensors: dict[str, TensorInfo], where: Path, read) -> dict[str, TensorInfo]:
    """`tensors` (stored names) with each quantized weight's parts replaced by its logical tensor, in stored order;
    `read(info)` reads a small stored tensor a scheme keeps a shape in."""
    return scheme.view(tensors, logical_dtype(config), where, read)


__all__ = ["REFUSED", "SCHEMES", "Scheme", "logical_dtype", "scheme_of", "view"]
