"""compressed-tensors (``quant_method: compressed-tensors``): what llm-compressor writes (INT4/INT8 ``pack-quantized``
such as Kimi-K2-Thinking, FP8 ``float-quantized``, ``int-quantized``, NVFP4 ``nvfp4-pack-quantized`` ...).

The ``compressed-tensors`` library is the decoder: its ``QuantizationConfig`` validates the config, each config
group's compressor names the tensors a quantized module stores (``compression_param_names``: ``weight_packed``,
``weight_scale``, ``weight_shape`` ...) and decompresses them (``decompress``). A module it targets and does not
ignore is one logical ``<module>.weight``; every quantization parameter stored beside it is one of its parts.
Parts are copied as they are: a module is kept or dropped whole, never cut (no block of rows of a group-quantized
weight is written quantized).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.io.dtypes import torch_dtype
from surgery.io.quantized.scheme import Scheme
from surgery.io.safetensors_format import TensorInfo

INSTALL = "pip install compressed-tensors"


def _library():
    try:
        import compressed_tensors  # lazy: only a compressed-tensors checkpoint needs it (it imports torch)
    except ImportError:
        return None
    return compressed_tensors


@dataclass(frozen=True)
class Group:
    """One config group: its compressed-tensors ``QuantizationScheme``, its format's compressor, and the tensors a
    module it quantizes stores (the compressor's ``compression_param_names``, the root first)."""

    name: str
    scheme: object
    compressor: object
    parameters: tuple[str, ...]
    format: str


class CompressedTensors(Scheme):
    method = "compressed-tensors"
    title = "compressed-tensors"
    skip_key = "ignore"

    def __init__(self, config: dict, where: Path):
        super().__init__(config, where)
        if _library() is None:
            raise SurgeryError(f"{where}: a compressed-tensors checkpoint needs the compressed-tensors library "
                               f"({INSTALL})")
        import pydantic  # lazy: with the library
        from compressed_tensors.compressors import BaseCompressor  # lazy: with the library
        from compressed_tensors.compressors.format import infer_module_format  # lazy: with the library
        from compressed_tensors.quantization import QuantizationConfig  # lazy: with the library

        try:
            parsed = QuantizationConfig.model_validate(config)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            raise SurgeryError(f"{where}: quantization_config is not a compressed-tensors config "
                               f"({'.'.join(str(p) for p in first['loc'])}: {first['msg']})") from None
        for key, what in (("sparsity_config", "sparse weights"), ("kv_cache_scheme", "quantized KV-cache scales"),
                          ("transform_config", "weight transforms")):
            if config.get(key):
                raise SurgeryError(f"{where}: quantization_config {key} ({what}) is not read; surgery reads "
                                   f"compressed-tensors checkpoints of quantized weights")
        status = config.get("quantization_status", "compressed")
        if status != "compressed":
            raise SurgeryError(f"{where}: quantization_status {status!r} is not read (expected 'compressed', as "
                               f"llm-compressor saves a model)")
        import torch  # lazy: with the library

        self.groups: list[Group] = []  # in config order
        for name, scheme in parsed.config_groups.items():
            declared = scheme.format or (parsed.format if parsed.format != "mixed-precision" else None)
            fmt = declared or infer_module_format(torch.nn.Linear, scheme).value
            compressor = BaseCompressor.get_value_from_registry(str(getattr(fmt, "value", fmt)))
            try:
                names = compressor.compression_param_names(scheme)
            except NotImplementedError:
                raise SurgeryError(f"{where}: config group {name!r} has format {fmt!r}, which is not read "
                                   f"(no model-free decompression in compressed-tensors)") from None
            self.groups.append(Group(name, scheme, compressor, tuple(names), str(getattr(fmt, "value", fmt))))
        self.ignore = list(parsed.ignore or [])

    # ---------------------------------------------------------------- reading
    def _group_of(self, module: str):
        from compressed_tensors.utils.match import match_name  # lazy: with the library

        if any(match_name(module, entry) for entry in self.ignore):
            return None
        for group in self.groups:
            targets = group.scheme.targets
            if "Linear" in targets or any(match_name(module, target) for target in targets):
                return group
        return None

    def view(self, tensors: dict[str, TensorInfo], dtype: str, where: Path, read=None) -> dict[str, TensorInfo]:
        from compressed_tensors.quantization import QuantizationMetadata  # lazy: with the library

        qparams = set(QuantizationMetadata.all_qparam_names()) | {name for group in self.groups for name in group.parameters}
        modules: dict[str, dict[str, TensorInfo]] = {}
        for name, info in tensors.items():
            module, _, parameter = name.rpartition(".")
            if parameter in qparams and not module.endswith("norm"):
                modules.setdefault(module, {})[parameter] = info
        quantized: dict[str, tuple] = {}  # module -> its group, for every module stored quantized
        for module, stored in modules.items():
            group = self._group_of(module)
            if group is None or group.parameters[0] not in stored:
                continue
            missing = [part for part in group.parameters if part not in stored]
            root = stored[group.parameters[0]]
            if missing and root.dtype in ("BF16", "F16", "F32") and group.parameters[0] == "weight":
                continue  # an unquantized weight of a targeted module (an embedding, a head left out)
            if missing:
                raise SurgeryError(f"{root.file}: tensor {root.name!r} is a {group.format} weight without "
                                   f"{module}.{missing[0]} (config group {group.name!r} stores "
                                   f"{', '.join(group.parameters)})")
            quantized[module] = group
        out: dict[str, TensorInfo] = {}
        for name, info in tensors.items():
            module, _, parameter = name.rpartition(".")
            group = quantized.get(module)
            if group is None or parameter not in modules[module]:
                out[name] = info
            elif parameter == group.parameters[0]:  # the root: the logical weight, with every parameter stored beside it
                stored = modules[module]
                parts = tuple((part, stored[part]) for part in sorted(stored, key=lambda p: (p not in group.parameters, p)))
                shape = self._shape(group, dict(parts), read)
                logical = module + ".weight"
                out[logical] = TensorInfo(logical, dtype, shape, info.file, info.offset,
                                          sum(part.nbytes for _, part in parts), self.method, parts)
        return out

    def _shape(self, group, parts: dict[str, TensorInfo], read) -> tuple[int, ...]:
        """The dequantized weight's shape: ``weight_shape`` where stored, else what the compressor makes of the parts'
        shapes on the meta device (no data read)."""
        import torch  # lazy: with the library

        if "weight_shape" in parts:
            if read is None:
                raise AssertionError("reading weight_shape needs the checkpoint")
            return tuple(int(v) for v in read(parts["weight_shape"]).tolist())
        meta = {name: torch.empty(info.shape, dtype=torch_dtype(info.dtype), device="meta")
                for name, info in parts.items() if name in group.parameters}
        return tuple(group.compressor.decompress(meta, group.scheme)["weight"].shape)

    def dequantize_parts(self, info: TensorInfo, values: dict):
        group = self._group_of(info.name.removesuffix(".weight"))
        state = {name: value for name, value in values.items() if name in group.parameters}
        return group.compressor.decompress(state, group.scheme)["weight"].float()

    # ---------------------------------------------------------------- writing: a module whole, as stored
    def stored_names(self, logical: str, info: TensorInfo) -> dict[str, str]:
        module = logical.removesuffix(".weight")
        return {role: f"{module}.{role}" for role, _ in info.parts}

    def part_layout(self, info: TensorInfo, shape: tuple[int, ...]):
        """The parts as stored, for the weight's own shape only: a module is copied whole."""
        if tuple(shape) != tuple(info.shape):
            return None
        return {role: (part.dtype, tuple(part.shape)) for role, part in info.parts}

    def part_rows(self, shape, role, start, stop):
        return None

    def joinable(self, item, out) -> bool:
        return False

    def covered(self, module: str, patterns: list[str]) -> bool:
        from compressed_tensors.utils.match import match_name  # lazy: with the library

        return any(match_name(module, pattern) for pattern in patterns)

    def describe(self, info: TensorInfo) -> str:
        group = self._group_of(info.name.removesuffix(".weight"))
        weights = group.scheme.weights
        size = f" of {weights.group_size}" if weights.group_size else ""
        return f"{group.format}: {weights.num_bits}-bit {weights.type}, {weights.strategy}{size} scales"
