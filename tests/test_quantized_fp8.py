"""FP8 block-scaled checkpoints (``quant_method: fp8``, as DeepSeek-V3 publishes them), read as the model they encode:
pruned, copied and extracted with every kept weight and scale a byte copy, run layer by layer on dequantized
weights, widened on request, refused when malformed.

The fixtures quantize a tiny transformers-built model (tests/quantized_models.py). Blocks of 4 x 4 divide every
dimension, so transformers' own dequantizing loader (``FineGrainedFP8Config(dequantize=True)``) reads them and is
the reference; blocks of 16 leave partial edge blocks (rows of 12, 20, 44), checked against the format's definition.
"""

import json
import shutil

import pytest
import torch
from quantized_models import (
    QUANTIZED_COMMANDS,
    QUANTIZED_CORPUS,
    assert_runner_reads_what_transformers_loads,
    dequantize_fp8,
    load_dequantized,
    save_fp8,
)
from tiny_models import logits, sample_ids, save_model, tensors

import surgery
from surgery import families as arch
from surgery.io.checkpoint import Checkpoint

FAMILIES = ("mixtral", "deepseek_v3")


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    built = {}

    def get(family, block=(4, 4)):
        key = (family, tuple(block))
        if key not in built:
            built[key] = save_fp8(root / f"{family}-{block[0]}", family, block=block, seed=5)
        return built[key]
    return get


def raw(value: torch.Tensor) -> torch.Tensor:
    """The stored bytes of a tensor (float8 compared as bytes: torch.equal has no float8 kernel on CPU)."""
    return value.contiguous().view(torch.uint8)


def prune_details(directory) -> dict:
    from safetensors import safe_open

    shard = sorted(directory.glob("*.safetensors"))[0]
    with safe_open(str(shard), "pt") as handle:
        return json.loads(handle.metadata()["surgery_prune"])


def config_of(directory):
    return json.loads((directory / "config.json").read_text())


def test_a_quantized_weight_opens_as_one_tensor_of_the_model_with_its_parts(fp8):
    directory = fp8("deepseek_v3")
    with Checkpoint.open(directory) as checkpoint:
        info = checkpoint.info("model.layers.1.self_attn.kv_a_proj_with_mqa.weight")
        assert (info.dtype, info.shape, info.scheme) == ("BF16", (12, 32), "fp8")
        assert [(role, part.dtype, part.shape) for role, part in info.parts] == [
            ("weight", "F8_E4M3", (12, 32)), ("weight_scale_inv", "F32", (3, 8))]
        assert not any(name.endswith("_scale_inv") for name in checkpoint.tensors)
        assert checkpoint.info("model.layers.1.mlp.gate.weight").parts == ()  # the router is stored unquantized


@pytest.mark.parametrize("family", FAMILIES)
def test_the_layer_runner_reads_exactly_the_weights_transformers_dequantizes(fp8, family):
    assert_runner_reads_what_transformers_loads(fp8(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_ratio_0_copies_every_kept_tensor_byte_for_byte_and_computes_the_source_logits(
        fp8, family, tmp_path, run_cli, token_file):
    source = fp8(family)
    out = tmp_path / "out"
    code, _, err = run_cli("prune", source, out, "--ratio", "0", "--calibration", token_file)
    assert code == 0, err
    stored, written = tensors(source), tensors(out)
    assert any(value.dtype == torch.float8_e4m3fn for value in written.values())
    for name, value in written.items():
        assert torch.equal(raw(value), raw(stored[name])), name
    assert config_of(out)["quantization_config"] == config_of(source)["quantization_config"]
    ids = sample_ids()
    assert torch.equal(logits(load_dequantized(out), ids), logits(load_dequantized(source), ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_half_keeps_byte_copies_of_the_kept_experts_values_and_scales(fp8, family, tmp_path, run_cli,
                                                                          token_file):
    source = fp8(family)
    out = tmp_path / "out"
    code, _, err = run_cli("prune", source, out, "--ratio", "0.5", "--calibration", token_file)
    assert code == 0, err
    kept = {layer: choice["kept"] for layer, choice in prune_details(out)["layers"].items()}
    stored, written = tensors(source), tensors(out)
    family_table = arch.detect_family(config_of(source))
    checked = 0
    for layer, experts in kept.items():
        for new, old in enumerate(experts):
            for spec in family_table.experts:
                for suffix in ("", "_scale_inv"):
                    assert torch.equal(raw(written[spec.name(int(layer), new) + suffix]),
                                       raw(stored[spec.name(int(layer), old) + suffix]))
                    checked += 1
    assert checked
    model = load_dequantized(out)  # strict: no missing or unexpected key
    assert torch.isfinite(logits(model, sample_ids())).all()


def test_copy_keeps_every_tensor_byte_for_byte(fp8, tmp_path, run_cli):
    source = fp8("deepseek_v3", (16, 16))
    code, _, err = run_cli("copy", source, tmp_path / "out")
    assert code == 0, err
    stored, written = tensors(source), tensors(tmp_path / "out")
    assert written.keys() == stored.keys()
    assert all(torch.equal(raw(written[name]), raw(stored[name])) for name in stored)


def test_copy_dtype_bf16_widens_every_weight_to_the_format_definition_partial_edge_blocks_included(
        fp8, tmp_path, run_cli):
    source = fp8("deepseek_v3", (16, 16))  # 12-, 20- and 44-row weights: partial edge blocks
    code, _, err = run_cli("copy", source, tmp_path / "out", "--dtype", "bf16")
    assert code == 0, err
    stored, written = tensors(source), tensors(tmp_path / "out")
    assert "quantization_config" not in config_of(tmp_path / "out")
    assert not any(name.endswith("_scale_inv") for name in written)
    widened = 0
    for name, value in stored.items():
        if name.endswith("_scale_inv"):
            weight = name.removesuffix("_scale_inv")
            expected = dequantize_fp8(stored[weight], value, (16, 16)).to(torch.bfloat16)
            assert torch.equal(written[weight], expected), weight
            widened += 1
    assert widened and written["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].shape == (12, 32)


def test_copy_layout_fused_and_back_round_trips_values_and_scales_byte_for_byte(fp8, tmp_path, run_cli):
    source = fp8("mixtral")
    code, _, err = run_cli("copy", source, tmp_path / "fused", "--layout", "fused")
    assert code == 0, err
    fused = tensors(tmp_path / "fused")
    assert fused["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.float8_e4m3fn
    assert fused["model.layers.0.mlp.experts.gate_up_proj_scale_inv"].shape == (4, 10, 8)
    code, _, err = run_cli("copy", tmp_path / "fused", tmp_path / "back", "--layout", "per-expert")
    assert code == 0, err
    stored, back = tensors(source), tensors(tmp_path / "back")
    assert back.keys() == stored.keys()
    assert all(torch.equal(raw(back[name]), raw(stored[name])) for name in stored)


def test_experts_a_block_would_straddle_are_written_unquantized_whole_and_listed(fp8, tmp_path, run_cli):
    source = fp8("mixtral", (16, 16))  # fused gate_up rows 20 | 20: the up rows start inside a 16-row block
    code, _, err = run_cli("copy", source, tmp_path / "fused", "--layout", "fused")
    assert code == 0, err
    assert "written unquantized" in err
    fused = tensors(tmp_path / "fused")
    assert fused["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    assert fused["model.layers.0.mlp.experts.down_proj"].dtype == torch.bfloat16  # its module, whole
    assert fused["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    listed = config_of(tmp_path / "fused")["quantization_config"]["modules_to_not_convert"]
    assert listed == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    with Checkpoint.open(source) as checkpoint:
        expected = torch.cat([checkpoint.read("model.layers.0.block_sparse_moe.experts.0.w1.weight"),
                              checkpoint.read("model.layers.0.block_sparse_moe.experts.0.w3.weight")])
    assert torch.equal(fused["model.layers.0.mlp.experts.gate_up_proj"][0], expected.to(torch.bfloat16))


def test_an_upcycle_of_an_fp8_dense_model_keeps_its_ffn_quantized_and_computes_the_dense_model(tmp_path, run_cli):
    dense = save_fp8(tmp_path / "llama", "llama", block=(4, 4))
    out = tmp_path / "moe"
    code, _, err = run_cli("upcycle", dense, out, "--num-experts", "4", "--top-k", "2")
    assert code == 0, err
    written, stored = tensors(out), tensors(dense)
    for expert in range(4):
        for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            for suffix in ("weight", "weight_scale_inv"):
                name = f"model.layers.1.block_sparse_moe.experts.{expert}.{ours}.{suffix}"
                assert torch.equal(raw(written[name]), raw(stored[f"model.layers.1.mlp.{theirs}.{suffix}"]))
    ids = sample_ids()
    torch.testing.assert_close(logits(load_dequantized(out), ids), logits(load_dequantized(dense), ids),
                               rtol=1e-5, atol=1e-5)


def test_inspect_shows_the_scheme_the_stored_formats_and_the_model_parameters(fp8, run_cli):
    directory = fp8("mixtral")
    code, out, err = run_cli("inspect", directory, "--json")
    assert code == 0, err
    report = json.loads(out)
    quantization = report["quantization"]
    assert quantization["quant_method"] == "fp8" and quantization["quantization_config"]["weight_block_size"] == [4, 4]
    assert quantization["formats"] == {"F8_E4M3, F32 scale per 4x4 block": quantization["quantized_tensors"]}
    assert set(report["dtypes"]) == {"BF16", "F8_E4M3", "F32"}
    reference = save_model(directory.parent / "mixtral-plain", "mixtral", seed=5)
    code, plain, _ = run_cli("inspect", reference, "--json")
    assert report["parameters"] == json.loads(plain)["parameters"]


@pytest.mark.parametrize("command", QUANTIZED_COMMANDS)
@pytest.mark.parametrize("kind, corrupt, fragment", QUANTIZED_CORPUS, ids=[row[0] for row in QUANTIZED_CORPUS])
def test_a_malformed_quantized_checkpoint_is_refused_in_one_line_before_any_output(
        fp8, tmp_path, run_cli, token_file, command, kind, corrupt, fragment):
    source = tmp_path / "src"
    shutil.copytree(fp8("mixtral"), source)
    corrupt(source)
    out = tmp_path / "out"
    args = {"inspect": (), "copy": (out,), "prune": (out, "--ratio", "0.5", "--calibration", token_file),
            "validate": ("--tokens", token_file)}[command]
    code, _, err = run_cli(command, source, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("surgery: error: "), err
    assert fragment in " ".join(err.split()), err
    assert not out.exists()


def test_extract_writes_the_expert_as_the_dense_models_ffn_values_and_scales_as_bytes(fp8, tmp_path, run_cli):
    source = fp8("mixtral")
    code, _, err = run_cli("extract", source, tmp_path / "dense", "--expert", "1")
    assert code == 0, err
    stored, written = tensors(source), tensors(tmp_path / "dense")
    for layer in range(2):
        for ours, theirs in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
            for suffix in ("weight", "weight_scale_inv"):
                assert torch.equal(raw(written[f"model.layers.{layer}.mlp.{ours}.{suffix}"]),
                                   raw(stored[f"model.layers.{layer}.block_sparse_moe.experts.1.{theirs}.{suffix}"]))
    assert config_of(tmp_path / "dense")["quantization_config"]["quant_method"] == "fp8"
    assert torch.isfinite(logits(load_dequantized(tmp_path / "dense"), sample_ids())).all()


def test_add_experts_from_fp8_dense_models_appends_their_ffns_as_bytes(fp8, tmp_path, run_cli, token_file):
    dense = save_fp8(tmp_path / "mistral", "mistral", block=(4, 4), seed=7, intermediate_size=20)
    code, _, err = run_cli("add-experts", fp8("mixtral"), tmp_path / "out", "--expert", f"m={dense}",
                           "--calibration", f"m={token_file}")
    assert code == 0, err
    written, stored = tensors(tmp_path / "out"), tensors(dense)
    for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
        for suffix in ("weight", "weight_scale_inv"):
            assert torch.equal(raw(written[f"model.layers.1.block_sparse_moe.experts.4.{ours}.{suffix}"]),
                               raw(stored[f"model.layers.1.mlp.{theirs}.{suffix}"]))
    assert torch.isfinite(logits(load_dequantized(tmp_path / "out"), sample_ids())).all()


def test_add_experts_from_an_unquantized_dense_model_writes_the_experts_modules_unquantized(fp8, tmp_path, run_cli,
                                                                                            token_file):
    dense = save_model(tmp_path / "mistral", "mistral", seed=7, dtype="bfloat16", intermediate_size=20)
    code, _, err = run_cli("add-experts", fp8("mixtral"), tmp_path / "out", "--expert", f"m={dense}",
                           "--calibration", f"m={token_file}")
    assert code == 0, err
    assert "written unquantized" in err
    written = tensors(tmp_path / "out")
    assert written["model.layers.1.block_sparse_moe.experts.0.w1.weight"].dtype == torch.bfloat16
    assert written["model.layers.1.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    listed = config_of(tmp_path / "out")["quantization_config"]["modules_to_not_convert"]
    assert listed == [f"model.layers.{layer}.block_sparse_moe.{module}"  # the routers: their fitted rows
                      for layer in range(2) for module in ("experts", "gate")]
    # in bfloat16: loaded in float32, transformers leaves experts listed unquantized in their stored bfloat16
    assert torch.isfinite(logits(load_dequantized(tmp_path / "out", torch.bfloat16), sample_ids()).float()).all()


def test_a_split_of_an_fp8_dense_model_writes_its_experts_dequantized_and_says_so(tmp_path, run_cli):
    dense = save_fp8(tmp_path / "llama", "llama", block=(4, 4))
    code, _, err = run_cli("split", dense, tmp_path / "moe", "-n", "4", "-k", "2", "--strategy", "random")
    assert code == 0, err
    assert "2 module(s) of fp8 weights are written unquantized (BF16" in " ".join(err.split())
    written = tensors(tmp_path / "moe")
    assert written["model.layers.0.block_sparse_moe.experts.0.w1.weight"].dtype == torch.bfloat16
    assert written["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert torch.isfinite(logits(load_dequantized(tmp_path / "moe", torch.bfloat16), sample_ids()).float()).all()


@pytest.mark.parametrize("stream", (None, True))
def test_validate_of_an_fp8_checkpoint_is_validate_of_its_widened_copy(fp8, tmp_path, run_cli, token_file, stream):
    """Unless told otherwise, validate runs a quantized checkpoint layer by layer on its dequantized weights: blocks of
    16 leave partial edge blocks, which transformers' FP8 loader refuses."""
    source = fp8("deepseek_v3", (16, 16))
    code, _, err = run_cli("copy", source, tmp_path / "f32", "--dtype", "fp32")
    assert code == 0, err
    quantized = surgery.validate(source, tokens=str(token_file), stream=stream)
    widened = surgery.validate(tmp_path / "f32", tokens=str(token_file), stream=stream)
    assert quantized["loss"] == widened["loss"]


def test_a_quantized_multimodal_checkpoint_is_refused_in_one_line(tmp_path, run_cli):
    from tiny_models import save_nested

    directory = save_nested(tmp_path / "llama4", "llama4")
    config = config_of(directory)
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [4, 4]}
    (directory / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli("inspect", directory)
    assert code == 2 and err.count("\n") == 1
    assert "a quantized Llama4ForConditionalGeneration is not read yet" in err


def test_copy_layout_fused_says_which_layout_transformers_reads_fp8_experts_in(fp8, tmp_path, run_cli):
    code, _, err = run_cli("copy", fp8("mixtral"), tmp_path / "fused", "--layout", "fused")
    assert code == 0, err
    assert "reads FP8 experts per expert only" in " ".join(err.split())


def test_a_merge_of_fp8_members_keeps_their_ffns_quantized_and_writes_the_average_unquantized(tmp_path, run_cli):
    from quantized_models import to_fp8
    from test_merge import TEXTS, save_member

    members = {name: to_fp8(save_member(tmp_path / name, seed=seed), (4, 4))
               for seed, name in enumerate(("a", "b"), start=1)}
    args = []
    for name, path in members.items():
        (tmp_path / f"{name}.txt").write_text(TEXTS[name])
        args += ["--expert", f"{name}={path}", "--calibration", f"{name}={tmp_path / f'{name}.txt'}"]
    code, _, err = run_cli("merge", tmp_path / "moe", *args, "--non-ffn", "average")
    assert code == 0, err
    written, a = tensors(tmp_path / "moe"), tensors(members["a"])
    for suffix in ("weight", "weight_scale_inv"):
        assert torch.equal(raw(written[f"model.layers.1.block_sparse_moe.experts.0.w1.{suffix}"]),
                           raw(a[f"model.layers.1.mlp.gate_proj.{suffix}"]))
    assert written["model.layers.1.self_attn.q_proj.weight"].dtype == torch.float32  # the average, in their dtype
    assert "written unquantized" in err
    assert torch.isfinite(logits(load_dequantized(tmp_path / "moe", torch.bfloat16), sample_ids()).float()).all()


def test_an_upcycle_with_dtype_widens_the_fp8_source(tmp_path, run_cli):
    dense = save_fp8(tmp_path / "llama", "llama", block=(4, 4))
    code, _, err = run_cli("upcycle", dense, tmp_path / "moe", "--num-experts", "4", "--top-k", "2", "--dtype", "bf16")
    assert code == 0, err
    written = tensors(tmp_path / "moe")
    assert "quantization_config" not in config_of(tmp_path / "moe")
    assert {value.dtype for value in written.values()} == {torch.bfloat16}
    with Checkpoint.open(dense) as checkpoint:
        expected = checkpoint.read("model.layers.1.mlp.gate_proj.weight").to(torch.bfloat16)
    assert torch.equal(written["model.layers.1.block_sparse_moe.experts.2.w1.weight"], expected)
