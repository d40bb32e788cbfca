"""What every quantization scheme says about itself (``Scheme``), and the model dtype its logical tensors take."""

from __future__ import annotations

import re
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.io.dtypes import DTYPE_ALIASES
from surgery.io.safetensors_format import TensorInfo


def logical_dtype(config: dict) -> str:
    """The safetensors dtype the unquantized tensors of a model are stored in (config ``dtype`` or ``torch_dtype``;
    BF16 where it says nothing): what a weight written unquantized takes."""
    declared = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").lower()
    return DTYPE_ALIASES.get(declared, "BF16")


class Scheme:
    """One ``quant_method``: how its weights are stored (roles, dtypes, shapes), read back and kept.

    A subclass is built from the ``quantization_config`` (refusing settings it does not read) and says:
    ``view`` (stored tensors -> logical ones, every part checked), ``stored_names`` (a logical tensor's parts
    under an output name), ``part_layout`` (each part's dtype and shape for a logical shape), ``dequantize_parts``,
    ``part_rows`` (a range of the logical tensor's rows, as rows of a part, where blocks allow) and ``joinable``
    (whether a logical tensor of `item` shape can be one of the pieces of a tensor of `out` shape part by part),
    ``module_of`` (the module a logical weight belongs to) and ``kept_config`` (the output's
    quantization_config)."""

    method: str = ""
    title: str = ""
    # said when experts are written stacked ([E, ...] values and scales): where that is not the layout the scheme's
    # checkpoints are read in
    stacked_note: str | None = None

    skip_key = "modules_to_not_convert"  # the quantization_config list of modules stored unquantized

    def __init__(self, config: dict, where: Path):
        self.config = dict(config)
        self.where = where
        skip = config.get(self.skip_key)
        if skip is not None and not (isinstance(skip, list) and all(isinstance(entry, str) for entry in skip)):
            raise SurgeryError(f"{where}: quantization_config {self.skip_key} must be a list of module names")

    def view(self, tensors: dict[str, TensorInfo], dtype: str, where: Path, read=None) -> dict[str, TensorInfo]:
        """`read(info)`: a small stored tensor's value (a shape a scheme stores as data)."""
        raise NotImplementedError

    def stored_names(self, logical: str, info: TensorInfo) -> dict[str, str]:
        raise NotImplementedError

    def part_layout(self, info: TensorInfo, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
        raise NotImplementedError

    def dequantize_parts(self, info: TensorInfo, values: dict):
        raise NotImplementedError

    def part_rows(self, shape: tuple[int, ...], role: str, start: int, stop: int) -> tuple[int, int] | None:
        raise NotImplementedError

    def joinable(self, item: tuple[int, ...], out: tuple[int, ...]) -> bool:
        raise NotImplementedError

    def module_of(self, logical: str) -> str:
        """The module transformers quantizes a logical weight in: its experts module for an expert's weight (per-expert
        ``...experts.3.w1.weight`` or fused ``...experts.gate_up_proj``: transformers holds them in one module), else
        the weight's own."""
        if ".experts." in logical:
            return logical[:logical.index(".experts.") + len(".experts")]
        return logical.removesuffix(".weight")

    def kept_config(self, unquantized: list[str], renames: dict[str, str], modules: set[str]) -> dict:
        """The output's quantization_config: `unquantized` output modules written in full precision (listed so that
        transformers does not expect them quantized); `renames` {source module: output module} of every module the
        output copies, `modules` every module of the source (a listed one absent from `renames` is gone)."""
        config = dict(self.config)
        listed = [renames.get(entry, entry) for entry in config.get(self.skip_key) or []
                  if entry in renames or entry not in modules]  # a module gone from the output is dropped
        listed += [module for module in unquantized if not self.covered(module, listed)]
        if listed:
            config[self.skip_key] = listed
        elif config.get(self.skip_key):
            config[self.skip_key] = []  # every module it listed is gone
        return config

    def covered(self, module: str, patterns: list[str]) -> bool:
        """Whether the skip list `patterns` already names `module` (transformers' matching)."""
        return skipped(module, patterns)

    def describe(self, info: TensorInfo) -> str:
        """The per-tensor format, as ``inspect`` shows it."""
        return " + ".join(f"{role} {part.dtype}{list(part.shape)}" for role, part in info.parts)


def skipped(module: str, patterns: list[str]) -> bool:
    """transformers' rule (``should_convert_module``): a pattern skips a module it matches from the start up to a
    module boundary, as a regex with that boundary, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for pattern in patterns:
        try:
            if re.match(rf"(?:{pattern}){boundary}", module):
                return True
        except re.error:
            pass
        if module.endswith(pattern):
            return True
    return False
