"""FP8 with block scales (``quant_method: fp8``): DeepSeek-V3/R1, Kimi-K2, GLM-4.5-FP8, Qwen3-*-FP8, MiniMax-M2.

A quantized weight ``X`` ([..., out, in]) is stored as ``X`` in F8_E4M3 and ``X_scale_inv`` (F32) of shape
[..., ceil(out / b0), ceil(in / b1)] for ``weight_block_size`` [b0, b1]; its value is each FP8 value times the scale
of its block, the partial blocks at the bottom and right edges included (DeepSeek-V3's 576-row
``kv_a_proj_with_mqa`` has one). Norms, embeddings, routers and the head are stored unquantized.
"""

from __future__ import annotations

import math
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.io.quantized.scheme import Scheme
from surgery.io.safetensors_format import TensorInfo

SCALE = "_scale_inv"
WEIGHT_DTYPES = {"e4m3": "F8_E4M3", "e5m2": "F8_E5M2"}
SCALE_DTYPES = ("F32", "BF16")
ACTIVATION_COMPANIONS = ("input_scale", "activation_scale")


class BlockFP8(Scheme):
    method = "fp8"
    title = "FP8, block-scaled"
    stacked_note = ("experts written fused keep their FP8 values and scales stacked ([E, ...] and [E, ...]_scale_inv); "
                    "transformers 5.25's dequantizing loader (FineGrainedFP8Config(dequantize=True)) reads FP8 "
                    "experts per expert only, the layout FP8 hub checkpoints use (--layout per-expert)")

    def __init__(self, config: dict, where: Path):
        super().__init__(config, where)
        fmt = config.get("fmt", "e4m3")
        if fmt not in WEIGHT_DTYPES:
            raise SurgeryError(f"{where}: quantization_config fmt {fmt!r} is not read (expected one of "
                               f"{', '.join(WEIGHT_DTYPES)})")
        self.weight_dtype = WEIGHT_DTYPES[fmt]
        block = config.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise SurgeryError(f"{where}: quantization_config weight_block_size {block!r}: expected two positive "
                               f"integers such as [128, 128] (per-tensor FP8 is not read)")
        self.block = tuple(block)
        activation = config.get("activation_scheme", "dynamic")
        if activation != "dynamic":
            raise SurgeryError(f"{where}: quantization_config activation_scheme {activation!r} is not read (static "
                               f"activation scales); surgery reads activation_scheme 'dynamic'")

    # ---------------------------------------------------------------- reading
    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[:-2]) + (math.ceil(shape[-2] / self.block[0]), math.ceil(shape[-1] / self.block[1]))

    def view(self, tensors: dict[str, TensorInfo], dtype: str, where: Path, read=None) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for name, info in tensors.items():
            if name.endswith(SCALE):
                if name.removesuffix(SCALE) not in tensors:
                    raise SurgeryError(f"{info.file}: tensor {name!r} is a block scale of no weight (expected "
                                       f"{name.removesuffix(SCALE)!r} beside it)")
                continue
            if name.rsplit(".", 1)[-1] in ACTIVATION_COMPANIONS:
                raise SurgeryError(f"{info.file}: tensor {name!r} is a static activation scale; surgery reads "
                                   f"fp8 checkpoints with activation_scheme 'dynamic' only")
            scale = tensors.get(name + SCALE)
            if scale is None:
                if info.dtype.startswith("F8_"):
                    raise SurgeryError(f"{info.file}: tensor {name!r} is {info.dtype} with no block scale "
                                       f"{name + SCALE!r} (the fp8 scheme stores one for each FP8 weight)")
                out[name] = info
                continue
            self._check(info, scale)
            out[name] = TensorInfo(name, dtype, info.shape, info.file, info.offset, info.nbytes + scale.nbytes,
                                   self.method, (("weight", info), ("weight_scale_inv", scale)))
        return out

    def _check(self, weight: TensorInfo, scale: TensorInfo) -> None:
        if weight.dtype != self.weight_dtype:
            raise SurgeryError(f"{weight.file}: tensor {weight.name!r} is stored in {weight.dtype}; the fp8 scheme "
                               f"(fmt {self.config.get('fmt', 'e4m3')}) stores quantized weights in {self.weight_dtype}")
        if len(weight.shape) < 2:
            raise SurgeryError(f"{weight.file}: tensor {weight.name!r} has shape {list(weight.shape)}; a block-scaled "
                               f"FP8 weight has at least two dimensions")
        if scale.dtype not in SCALE_DTYPES:
            raise SurgeryError(f"{scale.file}: tensor {scale.name!r} is stored in {scale.dtype}; block scales are "
                               f"{' or '.join(SCALE_DTYPES)}")
        expected = self.scale_shape(weight.shape)
        if tuple(scale.shape) != expected:
            raise SurgeryError(f"{scale.file}: tensor {scale.name!r} has shape {list(scale.shape)}, expected "
                               f"{list(expected)} (ceil of {weight.name}'s {list(weight.shape)} over blocks of "
                               f"{list(self.block)})")

    def dequantize_parts(self, info: TensorInfo, values: dict):
        """In float32, one band of block rows at a time: the weight's float32 copy is the only full-size buffer (a
        dense FFN of DeepSeek-V3 is 0.5 GB in float32; expanding the scales to its size would be another)."""
        import torch  # lazy: headers and byte copies need no torch

        out = values["weight"].to(torch.float32)
        scale = values["weight_scale_inv"].to(torch.float32)
        rows, columns = out.shape[-2:]
        step_rows, step_columns = self.block
        for band in range(scale.shape[-2]):
            row_scale = scale[..., band, :].repeat_interleave(step_columns, dim=-1)[..., :columns]
            out[..., band * step_rows:(band + 1) * step_rows, :].mul_(row_scale.unsqueeze(-2))
        return out

    # ---------------------------------------------------------------- writing
    def stored_names(self, logical: str, info: TensorInfo) -> dict[str, str]:
        return {"weight": logical, "weight_scale_inv": logical + SCALE}

    def part_layout(self, info: TensorInfo, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
        parts = dict(info.parts)
        return {"weight": (parts["weight"].dtype, tuple(shape)),
                "weight_scale_inv": (parts["weight_scale_inv"].dtype, self.scale_shape(shape))}

    def part_rows(self, shape: tuple[int, ...], role: str, start: int, stop: int) -> tuple[int, int] | None:
        """Rows start:stop of the logical tensor viewed 2-D ([all but the last dimension, last]) as rows of part
        `role` viewed the same way: always for the weight; for the scales where the rows are whole blocks of one
        matrix (the last may be its partial edge block) or whole matrices of a stacked [E, out, in]."""
        if role == "weight":
            return start, stop
        height, block = shape[-2], self.block[0]
        blocks = math.ceil(height / block)
        first, begin = divmod(start, height)
        last, end = divmod(stop, height)
        if end == 0 and last > first:
            last, end = last - 1, height
        if first == last and begin % block == 0 and (end % block == 0 or end == height):
            return first * blocks + begin // block, first * blocks + math.ceil(end / block)
        if begin == 0 and end == height:
            return first * blocks, (last + 1) * blocks
        return None

    def joinable(self, item: tuple[int, ...], out: tuple[int, ...]) -> bool:
        if tuple(item) == tuple(out[1:]):
            return True  # a whole matrix of a stacked [E, out, in]
        return len(item) == 2 and item[-1] == out[-1] and item[0] % self.block[0] == 0 and out[-2] % self.block[0] == 0

    def describe(self, info: TensorInfo) -> str:
        parts = dict(info.parts)
        return f"{parts['weight'].dtype}, {parts['weight_scale_inv'].dtype} scale per {self.block[0]}x{self.block[1]} block"
