"""`surgery copy --top-k K --norm-topk-prob true|false`: an MoE's routing rewritten in its config, weights byte for byte."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import load_model, logits, sample_ids, save_model


def config(directory):
    return json.loads((directory / "config.json").read_text())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    return {family: save_model(root / family, family) for family in ("mixtral", "qwen3_moe", "llama")}


def test_top_k_is_rewritten_and_every_weight_is_copied(tmp_path, run_cli, models):
    code, _, err = run_cli("copy", models["mixtral"], tmp_path / "out", "--top-k", "3")
    assert code == 0, err
    assert config(tmp_path / "out")["num_experts_per_tok"] == 3
    source, out = load_file(models["mixtral"] / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert source.keys() == out.keys() and all(torch.equal(source[name], out[name]) for name in source)
    assert "num_experts_per_tok 2 -> 3: each token now runs through 3 expert(s) per MoE layer" in err


def test_the_new_top_k_is_what_transformers_runs(tmp_path, run_cli, models):
    assert run_cli("copy", models["mixtral"], tmp_path / "k4", "--top-k", "4")[0] == 0
    model = load_model(tmp_path / "k4")
    assert model.config.num_experts_per_tok == 4
    ids = sample_ids(96)
    assert not torch.allclose(logits(model, ids), logits(load_model(models["mixtral"]), ids), atol=1e-4)


def test_the_same_top_k_changes_nothing_and_says_nothing(tmp_path, run_cli, models):
    code, _, err = run_cli("copy", models["mixtral"], tmp_path / "out", "--top-k", "2")
    assert code == 0, err
    assert "->" not in err
    ids = sample_ids(96)
    assert torch.equal(logits(load_model(tmp_path / "out"), ids), logits(load_model(models["mixtral"]), ids))


def test_norm_topk_prob_is_rewritten_where_the_format_has_it(tmp_path, run_cli, models):
    before = config(models["qwen3_moe"]).get("norm_topk_prob")
    flipped = "false" if before else "true"
    code, _, err = run_cli("copy", models["qwen3_moe"], tmp_path / "out", "--norm-topk-prob", flipped)
    assert code == 0, err
    assert config(tmp_path / "out")["norm_topk_prob"] is (flipped == "true")
    assert f"norm_topk_prob {str(bool(before)).lower()} -> {flipped}" in err
    load_model(tmp_path / "out")


def test_norm_topk_prob_is_refused_for_a_format_that_always_renormalises(tmp_path, run_cli, models):
    code, _, err = run_cli("copy", models["mixtral"], tmp_path / "out", "--norm-topk-prob", "false")
    assert code == 2
    assert err.strip().splitlines()[-1] == ("surgery: error: --norm-topk-prob: mixtral always renormalises its top-k "
                                            "weights (its config has no such switch)")
    assert not (tmp_path / "out").exists()


def test_top_k_beyond_the_expert_count_is_refused(tmp_path, run_cli, models):
    code, _, err = run_cli("copy", models["mixtral"], tmp_path / "out", "--top-k", "5")
    assert code == 2
    assert err.strip().splitlines()[-1] == "surgery: error: --top-k 5: must be between 1 and the number of experts (4)"


def test_top_k_of_a_dense_model_is_refused(tmp_path, run_cli, models):
    code, _, err = run_cli("copy", models["llama"], tmp_path / "out", "--top-k", "2")
    assert code == 2
    assert "LlamaForCausalLM is a dense model; --top-k and --norm-topk-prob apply to MoE models" in err
