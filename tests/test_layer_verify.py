"""`--verify` and `validate --expect-exact` compare layer by layer and name the first layer that differs."""

import shutil

import pytest
from safetensors.torch import load_file, save_file
from tiny_models import save_model

EXACT_CASES = [
    ("upcycle", "llama", ["-n", 4, "-k", 2]),
    ("upcycle", "llama", ["-n", 4, "-k", 2, "-g", 2]),
    ("upcycle", "qwen2", ["-n", 4, "-k", 2, "--shared-expert"]),
    ("upcycle", "qwen3", ["-n", 4, "-k", 1, "--router-init", "uniform"]),
    ("upcycle", "llama", ["-n", 4, "-k", 2, "--format", "qwen2_moe", "--moe-layers", "1"]),
    ("split", "llama", ["-n", 4, "-k", 4, "--strategy", "random"]),
    ("split", "qwen2", ["-n", 4, "-k", 4, "--strategy", "shared-norm"]),
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    return {family: save_model(root / family, family, seed=5) for family in ("llama", "qwen2", "qwen3")}


def written(run_cli, operation, source, out, *args):
    code, _, err = run_cli(operation, source, out, *args)
    assert code == 0, err
    return out


def corrupted(directory, out, change):
    shutil.copytree(directory, out)
    tensors = load_file(out / "model.safetensors")
    change(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def expect_exact(run_cli, model, reference):
    code, out, err = run_cli("validate", model, "-r", reference, "--expect-exact", "--device", "cpu")
    return code, " ".join((out + err).split())


@pytest.mark.parametrize("operation,family,args", EXACT_CASES, ids=lambda v: " ".join(map(str, v)) if isinstance(v, list) else v)
def test_every_exact_operation_passes_the_layer_by_layer_verify(tmp_path, run_cli, sources, operation, family, args):
    code, out, err = run_cli(operation, sources[family], tmp_path / "out", *args, "--verify")
    text = " ".join((out + err).split())
    assert code == 0, err
    assert "verify: passed: largest relative difference" in text


def test_one_expert_scaled_by_1_01_is_caught_at_its_layer(tmp_path, run_cli, sources):
    moe = written(run_cli, "upcycle", sources["llama"], tmp_path / "moe", "-n", 4, "-k", 2)

    def scale(tensors):
        tensors["model.layers.1.block_sparse_moe.experts.2.w2.weight"] *= 1.01

    code, text = expect_exact(run_cli, corrupted(moe, tmp_path / "bad", scale), sources["llama"])
    assert code == 2
    assert "layer 1: MoE output differs from the dense FFN by" in text and "layer 0:" not in text
    assert "(relative; tolerance 1.0e-05 in float32)" in text


def test_swapped_gate_projections_of_two_experts_in_an_exact_split_are_caught(tmp_path, run_cli, sources):
    moe = written(run_cli, "split", sources["llama"], tmp_path / "moe", "-n", 4, "-k", 4, "--strategy", "random")

    def swap(tensors):
        first, second = (f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight" for e in (0, 1))
        tensors[first], tensors[second] = tensors[second], tensors[first]

    code, text = expect_exact(run_cli, corrupted(moe, tmp_path / "bad", swap), sources["llama"])
    assert code == 2 and "layer 0: MoE output differs from the dense FFN by" in text


def test_a_granular_upcycle_without_its_down_projection_scale_is_caught(tmp_path, run_cli, sources):
    moe = written(run_cli, "upcycle", sources["qwen3"], tmp_path / "moe", "-n", 4, "-k", 2, "-g", 2)

    def unscale(tensors):
        for expert in range(4):
            tensors[f"model.layers.1.mlp.experts.{expert}.down_proj.weight"] /= 2

    code, text = expect_exact(run_cli, corrupted(moe, tmp_path / "bad", unscale), sources["qwen3"])
    assert code == 2 and "layer 1: MoE output differs from the dense FFN by 5.0e-01" in text


def test_the_verify_of_a_corrupted_write_fails_with_exit_2_and_keeps_the_output(tmp_path, run_cli, sources, monkeypatch):
    """The writer itself corrupting an expert (simulated) is what --verify exists to catch."""
    from surgery.plan import nodes as recipes_module

    original = recipes_module.Scale.compute

    def wrong(self):
        return original(self) * 1.01

    monkeypatch.setattr(recipes_module.Scale, "compute", wrong)  # every scaled down_proj of a granular upcycle
    code, out, err = run_cli("upcycle", sources["llama"], tmp_path / "out", "-n", 4, "-k", 2, "-g", 2, "--verify")
    text = " ".join((out + err).split())
    assert code == 2 and "--verify:" in text and "layer 0: MoE output differs from the dense FFN" in text
    assert "the output is kept for inspection" in text and (tmp_path / "out" / "config.json").exists()


def test_a_bfloat16_split_into_6_experts_verifies_within_the_rounding_it_introduces(tmp_path, run_cli):
    """x6 folded into bfloat16 down projections rounds them (1.9e-3 relative): --verify tolerates that rounding,
    which the plan declares; a strict --expect-exact, which knows nothing of the plan, names the layer."""
    source = save_model(tmp_path / "bf16", "llama", seed=5, dtype="bfloat16", intermediate_size=48)
    code, out, err = run_cli("split", source, tmp_path / "out", "-n", 6, "-k", 6, "--strategy", "random", "--verify")
    text = " ".join((out + err).split())
    assert code == 0 and "verify: passed" in text and "(tolerance 3.9e-03)" in text
    code, text = expect_exact(run_cli, tmp_path / "out", source)
    assert code == 2 and "layer 0: MoE output differs from the dense FFN" in text


def test_folded_factors_that_are_powers_of_two_round_nothing():
    from surgery.plan.moe import folded_rounding

    assert folded_rounding([2.0, 0.5, 4.0], "BF16") is None
    assert folded_rounding([6.0], "BF16") == "BF16" and folded_rounding([3.0], "F16") == "F16"
    assert folded_rounding([6.0], "F32") is None
