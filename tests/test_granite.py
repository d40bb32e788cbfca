"""Granite -> GraniteMoE: a target that stores its experts fused only (input_linear / output_linear)."""

import json

import pytest
import torch
from tiny_models import build_model, load_model, logits, sample_ids, save_model, tensors

MULTIPLIERS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")


def assert_reproduces(out, source):
    ids = sample_ids(96)
    assert torch.allclose(logits(load_model(out), ids), logits(load_model(source), ids), atol=1e-5)


@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("granite") / "src", "granite")


def test_upcycle_writes_fused_experts_under_granitemoe_names_and_reproduces_the_source(tmp_path, run_cli, granite):
    code, _, err = run_cli("upcycle", granite, tmp_path / "out", "-n", "4", "-k", "2", "--verify")
    assert code == 0, err
    out, source = tensors(tmp_path / "out"), tensors(granite)
    fused = out["model.layers.1.block_sparse_moe.input_linear.weight"]
    gate, up = source["model.layers.1.mlp.gate_proj.weight"], source["model.layers.1.mlp.up_proj.weight"]
    assert fused.shape == (4, 88, 32) and all(torch.equal(fused[e], torch.cat([gate, up])) for e in range(4))
    assert out["model.layers.1.block_sparse_moe.output_linear.weight"].shape == (4, 32, 44)
    assert "model.layers.1.block_sparse_moe.router.layer.weight" in out
    assert not any(".experts." in name for name in out)
    assert_reproduces(tmp_path / "out", granite)


def test_the_multipliers_are_carried(tmp_path, run_cli, granite):
    assert run_cli("upcycle", granite, tmp_path / "out", "-n", "4", "-k", "2")[0] == 0
    config, source = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "out", granite))
    assert config["model_type"] == "granitemoe"
    assert {key: config[key] for key in MULTIPLIERS} == {key: source[key] for key in MULTIPLIERS}


def test_calibrated_upcycle_reproduces_the_source(tmp_path, run_cli, granite, token_file):
    code, _, err = run_cli("upcycle", granite, tmp_path / "out", "-n", "4", "-k", "2", "--router-init", "calibrated",
                           "--calibration", token_file)
    assert code == 0, err
    assert_reproduces(tmp_path / "out", granite)


def test_split_at_k_equal_n_reproduces_the_source(tmp_path, run_cli, granite):
    code, _, err = run_cli("split", granite, tmp_path / "out", "-n", "4", "-k", "4", "--strategy", "random",
                           "--router-init", "zero", "--verify")
    assert code == 0, err
    assert_reproduces(tmp_path / "out", granite)


def test_a_calibrated_merge_fits_the_router_granitemoe_holds_in_memory(tmp_path, run_cli):
    from test_merge import TEXTS, save_member

    models = [save_member(tmp_path / name, "granite", seed=seed) for seed, name in enumerate(("a", "b"))]
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(TEXTS[name])
    code, _, err = run_cli("merge", tmp_path / "out", "--expert", f"a={models[0]}", "--expert", f"b={models[1]}",
                           "--router-init", "calibrated", "--calibration", f"a={tmp_path / 'a.txt'}",
                           "--calibration", f"b={tmp_path / 'b.txt'}", "--top-k", "1")
    assert code == 0, err
    router = tensors(tmp_path / "out")["model.layers.0.block_sparse_moe.router.layer.weight"]
    assert router.abs().sum() > 0
    load_model(tmp_path / "out")


def test_a_granitemoe_checkpoint_is_read_and_run(tmp_path, run_cli):
    model = build_model("granitemoe")
    model.save_pretrained(tmp_path / "moe")
    code, out, err = run_cli("inspect", tmp_path / "moe", "--strict")
    assert code == 0, err
    assert "experts fused" in out
    code, out, err = run_cli("validate", tmp_path / "moe", "--max-tokens", "64", "--json")
    assert code == 0, err
    assert [layer["layer"] for layer in json.loads(out)["routing"]] == [0, 1]


def test_copy_keeps_granitemoe_fused_whatever_layout_is_asked(tmp_path, run_cli):
    build_model("granitemoe").save_pretrained(tmp_path / "moe")
    assert run_cli("copy", tmp_path / "moe", tmp_path / "out", "--layout", "per-expert")[0] == 0
    assert set(tensors(tmp_path / "out")) == set(tensors(tmp_path / "moe"))


# ------------------------------------------------------------------ GraniteMoeShared: a shared expert without a gate
def test_the_dense_ffn_as_a_gateless_shared_expert_is_halved_with_the_routed_experts(tmp_path, run_cli, granite):
    code, _, err = run_cli("upcycle", granite, tmp_path / "out", "-n", "4", "-k", "2", "--format", "granitemoeshared",
                           "--shared-expert", "--verify")
    assert code == 0, err
    out, source = tensors(tmp_path / "out"), tensors(granite)
    gate, up = source["model.layers.0.mlp.gate_proj.weight"], source["model.layers.0.mlp.up_proj.weight"]
    down = source["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(out["model.layers.0.shared_mlp.input_linear.weight"], torch.cat([gate, up]))
    assert torch.equal(out["model.layers.0.shared_mlp.output_linear.weight"], down * 0.5)
    assert torch.equal(out["model.layers.0.block_sparse_moe.output_linear.weight"][2], down * 0.5)
    assert_reproduces(tmp_path / "out", granite)


def test_without_a_shared_expert_granitemoeshared_gets_none(tmp_path, run_cli, granite):
    code, _, err = run_cli("upcycle", granite, tmp_path / "out", "-n", "4", "-k", "2", "--format", "granitemoeshared")
    assert code == 0, err
    assert "shared expert" not in err
    assert not any("shared_mlp" in name for name in tensors(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["shared_intermediate_size"] == 0
    assert_reproduces(tmp_path / "out", granite)


def test_shared_neurons_of_a_split_become_the_gateless_shared_expert_unscaled(tmp_path, run_cli, granite):
    code, _, err = run_cli("split", granite, tmp_path / "out", "-n", "4", "-k", "4", "--strategy", "random",
                           "--router-init", "zero", "--format", "granitemoeshared", "--shared-neurons", "8", "--verify")
    assert code == 0, err
    assert "8 shared neurons per layer, a granitemoeshared shared expert (no gate: added whole)" in err
    assert tensors(tmp_path / "out")["model.layers.0.shared_mlp.output_linear.weight"].shape == (32, 8)
    assert_reproduces(tmp_path / "out", granite)


def test_a_granitemoeshared_checkpoint_is_read_and_run(tmp_path, run_cli):
    build_model("granitemoeshared").save_pretrained(tmp_path / "moe")
    code, out, err = run_cli("inspect", tmp_path / "moe", "--strict")
    assert code == 0, err
    code, out, err = run_cli("validate", tmp_path / "moe", "--reference", tmp_path / "moe", "--expect-exact",
                             "--max-tokens", "64")
    assert code == 0, err
