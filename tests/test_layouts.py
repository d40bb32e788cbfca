"""--layout per-expert|fused: MoE outputs in either layout, and copy converting between them byte for byte."""

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import build_model, load_model, logits, sample_ids, save_model, tensors

from surgery.io.checkpoint import Checkpoint

MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


def raw_bytes(directory):
    """Every tensor's stored bytes, by name."""
    out = {}
    with Checkpoint.open(directory) as checkpoint:
        for name in checkpoint.tensors:
            out[name] = bytes(checkpoint.read_bytes(name))
    return out


def save_both(tmp_path, family):
    """The same model saved by transformers per expert (original format) and fused (transformers 5's own)."""
    model = build_model(family)
    model.save_pretrained(tmp_path / "per-expert")
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    return tmp_path / "per-expert", tmp_path / "fused"


@pytest.mark.parametrize("family", MOE)
def test_copy_to_fused_writes_what_transformers_writes(tmp_path, run_cli, family):
    per_expert, fused = save_both(tmp_path, family)
    assert any("experts.gate_up_proj" in name for name in tensors(fused))  # transformers really fused it
    assert run_cli("copy", per_expert, tmp_path / "out", "--layout", "fused")[0] == 0
    assert raw_bytes(tmp_path / "out") == raw_bytes(fused)


@pytest.mark.parametrize("family", MOE)
def test_copy_to_per_expert_writes_what_transformers_writes_in_the_original_format(tmp_path, run_cli, family):
    per_expert, fused = save_both(tmp_path, family)
    assert run_cli("copy", fused, tmp_path / "out", "--layout", "per-expert")[0] == 0
    assert raw_bytes(tmp_path / "out") == raw_bytes(per_expert)


def test_a_round_trip_reproduces_every_byte_and_both_load_strictly(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "mixtral")
    assert run_cli("copy", source, tmp_path / "fused", "--layout", "fused")[0] == 0
    assert run_cli("copy", tmp_path / "fused", tmp_path / "back", "--layout", "per-expert")[0] == 0
    assert raw_bytes(tmp_path / "back") == raw_bytes(source)
    ids = sample_ids(96)
    assert torch.equal(logits(load_model(tmp_path / "fused"), ids), logits(load_model(source), ids))


def test_copy_keeps_the_layout_by_default(tmp_path, run_cli):
    _, fused = save_both(tmp_path, "mixtral")
    assert run_cli("copy", fused, tmp_path / "out")[0] == 0
    assert raw_bytes(tmp_path / "out") == raw_bytes(fused)


def test_inspect_names_the_layout(tmp_path, run_cli):
    per_expert, fused = save_both(tmp_path, "mixtral")
    assert "experts per_expert" in run_cli("inspect", per_expert)[1]
    assert "experts fused" in run_cli("inspect", fused)[1]


def test_fusing_a_float32_checkpoint_copies_bytes_without_torch(tmp_path):
    source = save_model(tmp_path / "src", "mixtral")
    code = ("import sys; from surgery.cli import main\n"
            f"try: main(['copy', {str(source)!r}, {str(tmp_path / 'out')!r}, '--layout', 'fused'])\n"
            "except SystemExit as e: assert not e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_casting_while_fusing_casts_each_part(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "mixtral")
    assert run_cli("copy", source, tmp_path / "out", "--layout", "fused", "--dtype", "bf16")[0] == 0
    fused = tensors(tmp_path / "out")["model.layers.1.mlp.experts.gate_up_proj"]
    original = tensors(source)
    expected = torch.stack([torch.cat([original[f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"],
                                       original[f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight"]])
                            for e in range(4)]).to(torch.bfloat16)
    assert torch.equal(fused, expected)


@pytest.mark.parametrize("operation", [("upcycle", "-n", "4", "-k", "2"),
                                       ("split", "-n", "4", "-k", "4", "--strategy", "random", "--router-init", "zero")])
def test_an_operation_writes_a_fused_output_that_reproduces_the_source(tmp_path, run_cli, operation):
    source = save_model(tmp_path / "src", "llama")
    code, _, err = run_cli(operation[0], source, tmp_path / "out", *operation[1:], "--layout", "fused", "--verify")
    assert code == 0, err
    names = set(tensors(tmp_path / "out"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and "model.layers.0.mlp.gate.weight" in names
    ids = sample_ids(96)
    assert torch.allclose(logits(load_model(tmp_path / "out"), ids), logits(load_model(source), ids), atol=1e-5)


def test_a_calibrated_merge_writes_fused_with_its_fitted_routers(tmp_path, run_cli):
    from test_merge import TEXTS, save_member

    models = [save_member(tmp_path / name, seed=seed) for seed, name in enumerate(("a", "b"))]
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(TEXTS[name])
    args = ["--expert", f"a={models[0]}", "--expert", f"b={models[1]}", "--router-init", "calibrated",
            "--calibration", f"a={tmp_path / 'a.txt'}", "--calibration", f"b={tmp_path / 'b.txt'}"]
    assert run_cli("merge", tmp_path / "per", *args)[0] == 0
    assert run_cli("merge", tmp_path / "fused", *args, "--layout", "fused")[0] == 0
    per, fused = tensors(tmp_path / "per"), tensors(tmp_path / "fused")
    for layer in range(2):
        assert torch.equal(fused[f"model.layers.{layer}.mlp.gate.weight"],
                           per[f"model.layers.{layer}.block_sparse_moe.gate.weight"])


def test_gate_and_up_swapped_in_a_fused_tensor_is_caught(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "mixtral")
    assert run_cli("copy", source, tmp_path / "fused", "--layout", "fused")[0] == 0
    path = tmp_path / "fused" / "model.safetensors"
    values = load_file(path)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    name = "model.layers.1.mlp.experts.gate_up_proj"
    half = values[name].shape[1] // 2
    values[name] = torch.cat([values[name][:, half:], values[name][:, :half]], dim=1).contiguous()
    save_file(values, path, metadata=metadata)
    code, _, err = run_cli("validate", tmp_path / "fused", "--reference", source, "--expect-exact", "--max-tokens", "64")
    assert code == 2 and "layer 1: FFN output differs from the reference's" in err


def test_fused_is_refused_for_a_dense_output(tmp_path, run_cli):
    source = save_model(tmp_path / "src", "llama")
    code, _, err = run_cli("copy", source, tmp_path / "out", "--layout", "fused")
    assert code == 2
    assert err.strip().splitlines()[-1] == ("surgery: error: --layout fused: the output is a LlamaForCausalLM, "
                                            "which has no experts to fuse")
    assert not (tmp_path / "out").exists()
