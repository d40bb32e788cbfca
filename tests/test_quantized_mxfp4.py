"""MXFP4 checkpoints (``quant_method: mxfp4``, as gpt-oss publishes its experts), read as the model they encode:
experts pruned as bytes (blocks and scales), run layer by layer on dequantized weights equal to transformers'
``Mxfp4Config(dequantize=True)``, widened on request, refused when malformed."""

import json
import shutil

import pytest
import torch
from quantized_models import (
    MXFP4_CORPUS,
    assert_runner_reads_what_transformers_loads,
    dequantize_mxfp4,
    load_dequantized,
    save_mxfp4,
)
from tiny_models import load_model, logits, sample_ids, tensors

from surgery.io.checkpoint import Checkpoint

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    return save_mxfp4(tmp_path_factory.mktemp("mxfp4") / "gpt-oss", seed=2)


def config_of(directory):
    return json.loads((directory / "config.json").read_text())


def kept_experts(directory) -> dict:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        layers = json.loads(handle.metadata()["surgery_prune"])["layers"]
    return {int(layer): choice["kept"] for layer, choice in layers.items()}


def test_blocks_and_scales_open_as_the_input_major_weight_gpt_oss_holds(mxfp4):
    with Checkpoint.open(mxfp4) as checkpoint:
        info = checkpoint.info(GATE_UP)
        assert (info.shape, info.scheme) == ((4, 32, 64), "mxfp4")
        assert [(role, part.dtype, part.shape) for role, part in info.parts] == [
            ("blocks", "U8", (4, 64, 1, 16)), ("scales", "U8", (4, 64, 1))]
        stored = tensors(mxfp4)
        expected = dequantize_mxfp4(stored[GATE_UP + "_blocks"], stored[GATE_UP + "_scales"]).transpose(-1, -2)
        assert torch.equal(checkpoint.read(GATE_UP), expected)


def test_the_layer_runner_reads_exactly_the_weights_transformers_dequantizes(mxfp4):
    assert_runner_reads_what_transformers_loads(mxfp4)


def test_prune_ratio_0_copies_every_tensor_byte_for_byte_and_computes_the_source_logits(mxfp4, tmp_path, run_cli,
                                                                                       token_file):
    code, _, err = run_cli("prune", mxfp4, tmp_path / "out", "--ratio", "0", "--calibration", token_file)
    assert code == 0, err
    stored, written = tensors(mxfp4), tensors(tmp_path / "out")
    assert written.keys() == stored.keys()
    assert all(torch.equal(written[name], stored[name]) for name in stored)
    assert config_of(tmp_path / "out")["quantization_config"] == config_of(mxfp4)["quantization_config"]
    ids = sample_ids()
    assert torch.equal(logits(load_dequantized(tmp_path / "out"), ids), logits(load_dequantized(mxfp4), ids))


def test_prune_half_keeps_the_kept_experts_blocks_and_scales_as_bytes(mxfp4, tmp_path, run_cli, token_file):
    code, _, err = run_cli("prune", mxfp4, tmp_path / "out", "--ratio", "0.5", "--calibration", token_file)
    assert code == 0, err
    stored, written = tensors(mxfp4), tensors(tmp_path / "out")
    for layer, kept in kept_experts(tmp_path / "out").items():
        for name in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales",
                     "gate_up_proj_bias", "down_proj_bias"):
            full = f"model.layers.{layer}.mlp.experts.{name}"
            assert torch.equal(written[full], stored[full][kept]), full
    model = load_dequantized(tmp_path / "out")  # strict: no missing or unexpected key
    assert torch.isfinite(logits(model, sample_ids())).all()


def test_copy_dtype_bf16_widens_the_experts_to_the_format_definition(mxfp4, tmp_path, run_cli):
    code, _, err = run_cli("copy", mxfp4, tmp_path / "out", "--dtype", "bf16")
    assert code == 0, err
    stored, written = tensors(mxfp4), tensors(tmp_path / "out")
    assert "quantization_config" not in config_of(tmp_path / "out")
    for name in (GATE_UP, "model.layers.1.mlp.experts.down_proj"):
        expected = dequantize_mxfp4(stored[name + "_blocks"], stored[name + "_scales"]).transpose(-1, -2)
        assert torch.equal(written[name], expected.to(torch.bfloat16)), name
    # FP4 values times powers of two are exact in bf16: the widened model computes the quantized one
    assert torch.equal(logits(load_model(tmp_path / "out"), sample_ids()), logits(load_dequantized(mxfp4), sample_ids()))


@pytest.mark.parametrize("command", ("inspect", "copy", "prune"))
@pytest.mark.parametrize("kind, corrupt, fragment", MXFP4_CORPUS, ids=[row[0] for row in MXFP4_CORPUS])
def test_a_malformed_mxfp4_checkpoint_is_refused_in_one_line_before_any_output(
        mxfp4, tmp_path, run_cli, token_file, command, kind, corrupt, fragment):
    source = tmp_path / "src"
    shutil.copytree(mxfp4, source)
    corrupt(source)
    out = tmp_path / "out"
    args = {"inspect": (), "copy": (out,), "prune": (out, "--ratio", "0.5", "--calibration", token_file)}[command]
    code, _, err = run_cli(command, source, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("surgery: error: "), err
    assert fragment in " ".join(err.split()), err
    assert not out.exists()
