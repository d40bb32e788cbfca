"""MXFP4 (``quant_method: mxfp4``): gpt-oss-20b and gpt-oss-120b publish their experts this way.

A quantized weight ``X`` is stored as ``X_blocks`` (U8 [..., rows, G, 16]: 32 FP4 E2M1 values per block along the
input dimension, two per byte, the low nibble first) and ``X_scales`` (U8 [..., rows, G]: one E8M0 power-of-two
exponent per block, biased by 127); a value is the FP4 value times 2 ** (scale - 127). As transformers' ``mxfp4``
integration reads gpt-oss, the weight the model holds is the dequantized [..., rows, G * 32] transposed to
[..., G * 32, rows] (gpt-oss keeps its experts input-major). Blocks run along the input dimension only, so every
expert's blocks and scales are whole rows of the stored tensors: experts are kept and dropped as bytes.
"""

from __future__ import annotations

from pathlib import Path

from surgery.errors import SurgeryError
from surgery.io.quantized.scheme import Scheme
from surgery.io.safetensors_format import TensorInfo

BLOCKS, SCALES = "_blocks", "_scales"
BLOCK_VALUES = 32  # FP4 values per block: 16 bytes
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class MXFP4(Scheme):
    method = "mxfp4"
    title = "MXFP4, 32-value blocks with E8M0 scales"

    def view(self, tensors: dict[str, TensorInfo], dtype: str, where: Path, read=None) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for name, info in tensors.items():
            if name.endswith(SCALES):
                if name.removesuffix(SCALES) + BLOCKS not in tensors:
                    raise SurgeryError(f"{info.file}: tensor {name!r} holds MXFP4 scales of no blocks (expected "
                                       f"{name.removesuffix(SCALES) + BLOCKS!r} beside it)")
                continue
            if not name.endswith(BLOCKS):
                out[name] = info
                continue
            logical = name.removesuffix(BLOCKS)
            scales = tensors.get(logical + SCALES)
            if scales is None:
                raise SurgeryError(f"{info.file}: tensor {name!r} holds MXFP4 blocks with no scales "
                                   f"{logical + SCALES!r} (the mxfp4 scheme stores one exponent per block)")
            self._check(info, scales)
            *lead, rows, groups, _ = info.shape
            out[logical] = TensorInfo(logical, dtype, (*lead, groups * BLOCK_VALUES, rows), info.file, info.offset,
                                      info.nbytes + scales.nbytes, self.method, (("blocks", info), ("scales", scales)))
        return out

    def _check(self, blocks: TensorInfo, scales: TensorInfo) -> None:
        for part in (blocks, scales):
            if part.dtype != "U8":
                raise SurgeryError(f"{part.file}: tensor {part.name!r} is stored in {part.dtype}; the mxfp4 scheme "
                                   f"stores blocks and scales in U8")
        if len(blocks.shape) < 3 or blocks.shape[-1] != BLOCK_VALUES // 2:
            raise SurgeryError(f"{blocks.file}: tensor {blocks.name!r} has shape {list(blocks.shape)}; MXFP4 blocks "
                               f"are [..., rows, blocks, {BLOCK_VALUES // 2}]")
        if tuple(scales.shape) != tuple(blocks.shape[:-1]):
            raise SurgeryError(f"{scales.file}: tensor {scales.name!r} has shape {list(scales.shape)}, expected "
                               f"{list(blocks.shape[:-1])} (one scale per block of {blocks.name})")

    def dequantize_parts(self, info: TensorInfo, values: dict):
        import torch  # lazy: headers and byte copies need no torch

        blocks, scales = values["blocks"], values["scales"].to(torch.int32) - 127
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
        pairs = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)
        dequantized = torch.ldexp(pairs.reshape(*blocks.shape[:-1], BLOCK_VALUES), scales[..., None])
        return dequantized.reshape(*blocks.shape[:-2], -1).transpose(-1, -2).contiguous()

    # ---------------------------------------------------------------- writing
    def stored_names(self, logical: str, info: TensorInfo) -> dict[str, str]:
        return {"blocks": logical + BLOCKS, "scales": logical + SCALES}

    def part_layout(self, info: TensorInfo, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
        *lead, columns, rows = shape
        grid = (*lead, rows, columns // BLOCK_VALUES)
        return {"blocks": ("U8", (*grid, BLOCK_VALUES // 2)), "scales": ("U8", grid)}

    def part_rows(self, shape: tuple[int, ...], role: str, start: int, stop: int) -> tuple[int, int] | None:
        """Whole matrices of a stacked [E, in, out] only (the stored rows are its transpose's)."""
        if len(shape) < 3 or start % shape[-2] or stop % shape[-2]:
            return None
        per_matrix = shape[-1] * (shape[-2] // BLOCK_VALUES)  # 2-D rows of blocks (and of scales: one per block row)
        if role == "scales":
            per_matrix = shape[-1]
        return start // shape[-2] * per_matrix, stop // shape[-2] * per_matrix

    def joinable(self, item: tuple[int, ...], out: tuple[int, ...]) -> bool:
        return tuple(item) == tuple(out[1:])

    def describe(self, info: TensorInfo) -> str:
        return f"FP4 E2M1 x {BLOCK_VALUES}-value blocks, U8 E8M0 scales"
