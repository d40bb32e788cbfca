"""compressed-tensors checkpoints (``quant_method: compressed-tensors``, what llm-compressor writes), read through the
compressed-tensors library: INT4 ``pack-quantized`` (W4A16, groups) and FP8 ``float-quantized`` (per channel), for a
Mixtral and a DeepSeek-V3. Pruned with every kept module's stored tensors copied as bytes, run layer by layer on
weights equal to transformers' own decompression (``CompressedTensorsConfig(run_compressed=False)``)."""

import json

import pytest
import torch
from quantized_models import (
    assert_runner_reads_what_transformers_loads,
    compressed_scheme,
    load_dequantized,
    save_compressed,
)
from tiny_models import logits, sample_ids, tensors

from surgery.io.checkpoint import Checkpoint

# transformers loads these models in bfloat16 only: in float32 its decompressed experts come out in bfloat16 beside
# float32 attention, and the forward pass fails (a dtype mismatch in its Mixtral experts)
BF16 = torch.bfloat16
CASES = [("mixtral", "w4a16"), ("mixtral", "fp8"), ("deepseek_v3", "w4a16"), ("deepseek_v3", "fp8")]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed")
    built = {}

    def get(family, kind):
        if (family, kind) not in built:
            built[family, kind] = save_compressed(root / f"{family}-{kind}", family, kind, seed=1)
        return built[family, kind]
    return get


def raw(value: torch.Tensor) -> torch.Tensor:
    return value.contiguous().view(torch.uint8)


def config_of(directory):
    return json.loads((directory / "config.json").read_text())


def test_a_packed_module_opens_as_its_weight_with_every_stored_parameter_as_a_part(compressed):
    with Checkpoint.open(compressed("deepseek_v3", "w4a16")) as checkpoint:
        info = checkpoint.info("model.layers.1.self_attn.kv_a_proj_with_mqa.weight")
        assert (info.dtype, info.shape, info.scheme) == ("BF16", (12, 32), "compressed-tensors")
        assert [(role, part.dtype, part.shape) for role, part in info.parts] == [
            ("weight_packed", "I32", (12, 4)), ("weight_scale", "BF16", (12, 8)), ("weight_shape", "I64", (2,))]
        assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_packed" not in checkpoint.tensors


@pytest.mark.parametrize("family, kind", CASES)
def test_the_layer_runner_reads_exactly_the_weights_transformers_decompresses(compressed, family, kind):
    """In bfloat16, the checkpoint's dtype. (Loaded in float32, transformers folds an FP8 expert's scale in float32
    and every other module's through the library, in the scale's bfloat16: docs/quantized.md.)"""
    assert_runner_reads_what_transformers_loads(compressed(family, kind), BF16)


@pytest.mark.parametrize("family, kind", CASES)
def test_prune_ratio_0_copies_every_kept_tensor_byte_for_byte_and_computes_the_source_logits(
        compressed, family, kind, tmp_path, run_cli, token_file):
    source = compressed(family, kind)
    code, _, err = run_cli("prune", source, tmp_path / "out", "--ratio", "0", "--calibration", token_file)
    assert code == 0, err
    stored, written = tensors(source), tensors(tmp_path / "out")
    for name, value in written.items():
        assert torch.equal(raw(value), raw(stored[name])), name
    assert config_of(tmp_path / "out")["quantization_config"] == config_of(source)["quantization_config"]
    ids = sample_ids()
    assert torch.equal(logits(load_dequantized(tmp_path / "out", BF16), ids), logits(load_dequantized(source, BF16), ids))


@pytest.mark.parametrize("family, kind", CASES)
def test_prune_half_keeps_each_kept_experts_stored_tensors_as_bytes_and_loads(compressed, family, kind, tmp_path,
                                                                             run_cli, token_file):
    source = compressed(family, kind)
    code, _, err = run_cli("prune", source, tmp_path / "out", "--ratio", "0.5", "--calibration", token_file)
    assert code == 0, err
    from safetensors import safe_open

    with safe_open(str(sorted((tmp_path / "out").glob("*.safetensors"))[0]), "pt") as handle:
        layers = json.loads(handle.metadata()["surgery_prune"])["layers"]
    stored, written = tensors(source), tensors(tmp_path / "out")
    experts = "block_sparse_moe.experts" if family == "mixtral" else "mlp.experts"
    checked = 0
    for layer, choice in layers.items():
        for new, old in enumerate(choice["kept"]):
            prefix, source_prefix = f"model.layers.{layer}.{experts}.{new}.", f"model.layers.{layer}.{experts}.{old}."
            names = [name for name in written if name.startswith(prefix)]
            assert names and all(torch.equal(raw(written[name]), raw(stored[name.replace(prefix, source_prefix)]))
                                 for name in names)
            checked += len(names)
    assert checked
    model = load_dequantized(tmp_path / "out", BF16)  # strict
    assert torch.isfinite(logits(model, sample_ids())).all()


def test_copy_dtype_bf16_decompresses_every_module_as_the_library_does(compressed, tmp_path, run_cli):
    from compressed_tensors.compressors import BaseCompressor

    source = compressed("mixtral", "w4a16")
    code, _, err = run_cli("copy", source, tmp_path / "out", "--dtype", "bf16")
    assert code == 0, err
    stored, written = tensors(source), tensors(tmp_path / "out")
    assert "quantization_config" not in config_of(tmp_path / "out")
    scheme = compressed_scheme("w4a16")
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    modules = [name.removesuffix(".weight_packed") for name in stored if name.endswith(".weight_packed")]
    for module in modules:
        state = {key: stored[f"{module}.{key}"] for key in ("weight_packed", "weight_scale", "weight_shape")}
        expected = compressor.decompress(state, scheme)["weight"].float().to(torch.bfloat16)
        assert torch.equal(written[module + ".weight"], expected), module
    assert modules and not any(name.endswith(("weight_packed", "weight_scale")) for name in written)
