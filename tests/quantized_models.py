"""Tiny quantized checkpoints, made by quantizing a tiny model's weights with each scheme's own rules.

FP8 with block scales (``quant_method: fp8``, as DeepSeek-V3 publishes): every linear weight of the decoder layers
(attention, dense MLPs, experts, shared experts; the MTP layer's too) quantized to ``torch.float8_e4m3fn`` per
block, the scale of a block its largest magnitude over 448 (stored as ``weight_scale_inv``, what multiplies the FP8
values back); embeddings, norms, routers and the head stay as they were.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tiny_models import save_model, tensors

FP8_MAX = 448.0
UNQUANTIZED = ("embed_tokens", "lm_head", "norm", ".gate.", "e_score_correction_bias", "shared_expert_gate")


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn values, float32 scales of shape [..., ceil(rows / b0), ceil(columns / b1)]) of `weight`."""
    rows, columns = weight.shape[-2:]
    grid = (math.ceil(rows / block[0]), math.ceil(columns / block[1]))
    padded = torch.zeros(*weight.shape[:-2], grid[0] * block[0], grid[1] * block[1])
    padded[..., :rows, :columns] = weight.float()
    blocks = padded.reshape(*weight.shape[:-2], grid[0], block[0], grid[1], block[1])
    scale = (blocks.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp(min=1e-12)
    values = (blocks / scale[..., :, None, :, None]).reshape(padded.shape)[..., :rows, :columns]
    return values.to(torch.float8_e4m3fn), scale


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The format's definition, element by element: each value times the scale of the block it falls in."""
    rows, columns = values.shape[-2:]
    row_block = torch.arange(rows) // block[0]
    column_block = torch.arange(columns) // block[1]
    return values.float() * scale[..., row_block[:, None], column_block[None, :]]


def is_quantized(name: str, value: torch.Tensor) -> bool:
    return value.dim() >= 2 and name.endswith(("weight", "_proj")) and not any(part in name for part in UNQUANTIZED)


def save_fp8(directory: Path, family: str, block=(4, 4), seed: int = 0, **overrides) -> Path:
    """A tiny `family` model saved in bf16, then rewritten in place as an fp8 block-scaled checkpoint."""
    return to_fp8(save_model(Path(directory), family, seed, dtype="bfloat16", **overrides), block)


def to_fp8(directory: Path, block=(4, 4)) -> Path:
    """Rewrite the checkpoint in `directory` in place as an fp8 block-scaled one (its linear weights quantized)."""
    def stored(name, value):
        if not is_quantized(name, value):
            return {name: value}
        values, scale = quantize_fp8(value, block)
        return {name: values, name + "_scale_inv": scale}

    return rewrite(directory, stored, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": list(block)})


def rewrite(directory: Path, stored, quantization: dict) -> Path:
    """Rewrite the checkpoint in `directory` in place: each tensor replaced by what `stored(name, value)` returns
    ({stored name: tensor}, in the same shard; the index follows), and `quantization` as its quantization_config."""
    from safetensors.torch import save_file

    directory = Path(directory)
    index_path = directory / "model.safetensors.index.json"
    shard_of = json.loads(index_path.read_text())["weight_map"] if index_path.exists() else None
    by_file: dict[str, dict] = {}
    for name, value in tensors(directory).items():
        by_file.setdefault(shard_of[name] if shard_of else "model.safetensors", {}).update(stored(name, value))
    for file, values in by_file.items():
        save_file({name: value.contiguous() for name, value in values.items()}, directory / file,
                  metadata={"format": "pt"})
    if shard_of:
        index = json.loads(index_path.read_text())
        index["weight_map"] = {name: file for file, values in by_file.items() for name in values}
        index_path.write_text(json.dumps(index, indent=2))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = quantization
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
MXFP4_UNQUANTIZED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U8 blocks [..., rows, G, 16], U8 E8M0 scales [..., rows, G]) of `weight` [..., rows, G * 32]: per block of 32
    values along the last dimension, the power of two that brings its largest magnitude to at most 6, each value
    rounded to the nearest FP4 E2M1 value, two per byte, the first in the low nibble."""
    blocks = weight.float().reshape(*weight.shape[:-1], -1, 32)
    exponent = torch.ceil(torch.log2(blocks.abs().amax(dim=-1).clamp(min=2.0 ** -126) / 6.0))
    scaled = blocks / torch.exp2(exponent)[..., None]
    codes = (scaled[..., None] - FP4_VALUES).abs().argmin(dim=-1).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, (exponent + 127).to(torch.uint8)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The format's definition: [..., rows, G * 32] from blocks and scales (before gpt-oss's transpose)."""
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], 32).long()
    values = FP4_VALUES[codes] * torch.exp2(scales.float() - 127)[..., None]
    return values.reshape(*blocks.shape[:-2], -1)


def save_mxfp4(directory: Path, seed: int = 0, **overrides) -> Path:
    """A tiny gpt-oss (hidden and expert width 32: whole MXFP4 blocks) saved in bf16, its experts rewritten as
    gpt-oss-20b stores them: ``*_blocks`` and ``*_scales`` of each [E, in, out] weight's transpose, biases as they
    were, the other modules listed unquantized."""
    def stored(name, value):
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return {name: value}
        blocks, scales = quantize_mxfp4(value.transpose(-1, -2))
        return {name + "_blocks": blocks, name + "_scales": scales}

    directory = save_model(Path(directory), "gpt_oss", seed, dtype="bfloat16", **{"intermediate_size": 32, **overrides})
    return rewrite(directory, stored, {"quant_method": "mxfp4", "modules_to_not_convert": MXFP4_UNQUANTIZED})


def compressed_scheme(kind: str):
    """The compressed-tensors QuantizationScheme of `kind`: "w4a16" (INT4 weights packed in int32, symmetric, groups of
    4 input columns: they divide every tiny width) or "fp8" (FP8 weights, one scale per output channel)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if kind == "w4a16":
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=4)
    else:
        weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    return QuantizationScheme(targets=["Linear"], weights=weights)


def quantize_compressed(weight: torch.Tensor, scheme) -> dict:
    """One module's stored tensors, made by the library: the scale of each group (or channel) its largest magnitude
    over the largest quantized value, then the format's compressor (``compress``)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format

    args = scheme.weights
    weight = weight.float()
    rows, columns = weight.shape
    if args.strategy == "group":
        groups = weight.reshape(rows, columns // args.group_size, args.group_size)
        scale = groups.abs().amax(dim=-1) / 7.0  # symmetric INT4: [-8, 7]
    else:
        scale = weight.abs().amax(dim=-1, keepdim=True) / 448.0
    state = {"weight": weight, "weight_scale": scale.clamp(min=1e-8).to(torch.bfloat16)}
    compressor = BaseCompressor.get_value_from_registry(infer_module_format(torch.nn.Linear, scheme).value)
    return compressor.compress(state, scheme)


def save_compressed(directory: Path, family: str, kind: str = "w4a16", seed: int = 0, **overrides) -> Path:
    """A tiny `family` model saved in bf16, its linear weights (as ``save_fp8`` picks them) rewritten in the
    compressed-tensors format of `kind`, with the config llm-compressor writes (``QuantizationConfig``)."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig

    scheme = compressed_scheme(kind)

    def stored(name, value):
        if not (is_quantized(name, value) and name.endswith(".weight")):
            return {name: value}
        module = name.removesuffix(".weight")
        return {f"{module}.{key}": part for key, part in quantize_compressed(value, scheme).items()}

    fmt = infer_module_format(torch.nn.Linear, scheme).value
    quantization = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=["lm_head"],
                                      quantization_status="compressed").model_dump(mode="json")
    quantization["quant_method"] = "compressed-tensors"
    return rewrite(save_model(Path(directory), family, seed, dtype="bfloat16", **overrides), stored, quantization)


def assert_runner_reads_what_transformers_loads(directory: Path, dtype=torch.float32) -> None:
    """Every decoder layer as the layer runner materialises it from the checkpoint equals, tensor for tensor and bit
    for bit, the layer transformers' dequantizing loader builds (``load_dequantized``), in `dtype`."""
    from surgery.execution.weights import ModelWeights
    from surgery.io.checkpoint import Checkpoint

    model = load_dequantized(directory, dtype)
    with Checkpoint.open(directory) as checkpoint:
        weights = ModelWeights.from_checkpoint(checkpoint)
        for layer in range(weights.num_layers):
            ours = weights.materialize(weights.layer_tensors(layer), dtype, "cpu")
            theirs = model.model.layers[layer].state_dict()
            assert ours.keys() == theirs.keys()
            for name, value in ours.items():
                assert torch.equal(value, theirs[name]), (directory, layer, name)


def load_dequantized(directory: Path, dtype=torch.float32):
    """The checkpoint loaded by transformers with its own dequantizing loader, strictly (no missing or unexpected
    key outside a hub checkpoint's MTP layer)."""
    import transformers

    config = json.loads((Path(directory) / "config.json").read_text())
    method = config["quantization_config"]["quant_method"]
    quantization = {"fp8": lambda: transformers.FineGrainedFP8Config(dequantize=True),
                    "mxfp4": lambda: transformers.Mxfp4Config(dequantize=True),
                    "compressed-tensors": lambda: transformers.CompressedTensorsConfig(run_compressed=False)}[method]()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=quantization, dtype=dtype, experts_implementation="eager",
        output_loading_info=True)
    mtp = f"model.layers.{model.config.num_hidden_layers}."
    info["unexpected_keys"] = [key for key in info.get("unexpected_keys") or () if not key.startswith(mtp)]
    problems = {key: value for key, value in info.items() if value and key != "error_msgs"}
    assert not problems, f"loading {directory}: {problems}"
    return model.eval()


# ------------------------------------------------------------------ malformed fp8 checkpoints
# Each edits a tiny fp8 Mixtral (save_fp8(d, "mixtral"), one model.safetensors) in one precise way.
EXPERT_W1 = "model.layers.0.block_sparse_moe.experts.0.w1.weight"


def _edit_tensors(directory: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    values = load_file(directory / "model.safetensors")
    edit(values)
    save_file({name: value.contiguous() for name, value in values.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})


def _edit_quantization(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"].update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def scale_missing(d):
    _edit_tensors(d, lambda values: values.pop(EXPERT_W1 + "_scale_inv"))


def scale_wrong_shape(d):
    def edit(values):
        values[EXPERT_W1 + "_scale_inv"] = torch.ones(6, 8)
    _edit_tensors(d, edit)


def weight_not_fp8(d):
    def edit(values):
        values[EXPERT_W1] = values[EXPERT_W1].to(torch.bfloat16)
    _edit_tensors(d, edit)


def scale_without_weight(d):
    def edit(values):
        values["model.layers.0.self_attn.rotary.weight_scale_inv"] = torch.ones(1, 1)
    _edit_tensors(d, edit)


def unknown_method(d):
    _edit_quantization(d, quant_method="fp7")


def gptq(d):
    _edit_quantization(d, quant_method="gptq")


def awq(d):
    _edit_quantization(d, quant_method="awq")


def bitsandbytes(d):
    _edit_quantization(d, quant_method="bitsandbytes")


def static_activations(d):
    _edit_quantization(d, activation_scheme="static")


def block_size_not_two(d):
    _edit_quantization(d, weight_block_size=[128])


QUANTIZED_COMMANDS = ("inspect", "copy", "prune", "validate")
# (kind, build, message fragment): each refused by every command of QUANTIZED_COMMANDS before any output exists
QUANTIZED_CORPUS = [
    ("fp8: a weight without its block scale", scale_missing, f"is F8_E4M3 with no block scale '{EXPERT_W1}_scale_inv'"),
    ("fp8: a block scale of the wrong shape", scale_wrong_shape, "has shape [6, 8], expected [5, 8]"),
    ("fp8: a quantized weight stored in BF16", weight_not_fp8, "is stored in BF16; the fp8 scheme"),
    ("fp8: a block scale of no weight", scale_without_weight, "is a block scale of no weight"),
    ("fp8: static activation scales", static_activations, "activation_scheme 'static' is not read"),
    ("fp8: weight_block_size not two integers", block_size_not_two, "weight_block_size [128]: expected two"),
    ("unknown quant_method", unknown_method, "unknown quant_method 'fp7'"),
    ("GPTQ checkpoint", gptq, "quant_method 'gptq' (GPTQ"),
    ("AWQ checkpoint", awq, "quant_method 'awq' (AWQ"),
    ("bitsandbytes checkpoint", bitsandbytes, "quant_method 'bitsandbytes' (bitsandbytes"),
]


# ------------------------------------------------------------------ malformed mxfp4 checkpoints (save_mxfp4(d))
GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"


def mxfp4_scales_missing(d):
    _edit_tensors(d, lambda values: values.pop(GATE_UP + "_scales"))


def mxfp4_scales_wrong_shape(d):
    def edit(values):
        values[GATE_UP + "_scales"] = values[GATE_UP + "_scales"][:, :-1].clone()
    _edit_tensors(d, edit)


def mxfp4_blocks_not_u8(d):
    def edit(values):
        values[GATE_UP + "_blocks"] = values[GATE_UP + "_blocks"].to(torch.int16)
    _edit_tensors(d, edit)


MXFP4_CORPUS = [
    ("mxfp4: blocks without their scales", mxfp4_scales_missing, f"holds MXFP4 blocks with no scales '{GATE_UP}_scales'"),
    ("mxfp4: scales of the wrong shape", mxfp4_scales_wrong_shape, "has shape [4, 63, 1], expected [4, 64, 1]"),
    ("mxfp4: blocks stored in I16", mxfp4_blocks_not_u8, "is stored in I16; the mxfp4 scheme stores blocks and scales in U8"),
]
