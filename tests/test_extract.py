"""`surgery extract`: MoE -> dense, one expert's FFN or the experts' weights averaged, per MoE layer."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import load_model, logits, sample_ids, save_model, tensors

from surgery import families as arch

UPCYCLES = [("llama", "mixtral", "mistral"), ("mistral", "mixtral", "mistral"), ("qwen2", "qwen2_moe", "qwen2"),
            ("qwen3", "qwen3_moe", "qwen3"), ("olmo2", "flex_olmo", "olmo2"), ("granite", "granitemoe", "granite")]
LAYOUTS = ["per-expert", "fused"]
HF_MOES = [("mixtral", "mistral"), ("qwen3_moe", "qwen3"), ("granitemoe", "granite"), ("flex_olmo", "olmo2")]


def config_of(directory):
    return json.loads((directory / "config.json").read_text())


def expert_weights(directory, layer):
    """{role: [tensor of each expert]} of one MoE layer, whatever the stored layout."""
    config = config_of(directory)
    family = arch.detect_family(config)
    stored = tensors(directory)
    count = arch.dimensions(family, config)["experts"]
    if arch.detect_expert_layout(family, stored) == "per_expert":
        return {spec.role: [stored[spec.name(layer, e)] for e in range(count)] for spec in family.experts}
    gate_up, down = (stored[spec.name(layer)] for spec in family.fused_experts)
    ffn = gate_up.shape[1] // 2
    return {"gate": [gate_up[e, :ffn] for e in range(count)], "up": [gate_up[e, ffn:] for e in range(count)],
            "down": [down[e] for e in range(count)]}


@pytest.fixture
def upcycled(tmp_path, run_cli):
    def make(dense, moe, layout, *extra):
        source = save_model(tmp_path / dense, dense)
        out = tmp_path / f"{moe}-{layout}"
        code, _, err = run_cli("upcycle", source, out, "-n", 4, "-k", 2, "--format", moe, "--layout", layout, *extra)
        assert code == 0, err
        return source, out
    return make


@pytest.mark.parametrize("dense,moe,family,layout", [
    (*pair, layout) for pair in UPCYCLES for layout in LAYOUTS
    if layout.replace("-", "_") in arch.FAMILIES[pair[1]].stored_layouts])  # granitemoe: fused only
def test_one_expert_of_an_upcycled_moe_is_the_dense_source(dense, moe, family, layout, upcycled, tmp_path, run_cli):
    source, upcycled_moe = upcycled(dense, moe, layout)
    out = tmp_path / "extracted"
    extra = ["--shared-gate", "drop"] if arch.FAMILIES[moe].shared_expert else []
    code, _, err = run_cli("extract", upcycled_moe, out, "--expert", 2, *extra)
    assert code == 0, err
    config = config_of(out)
    assert config["model_type"] == family and config["intermediate_size"] == config_of(source)["intermediate_size"]
    written, original = tensors(out), tensors(source)
    assert sorted(written) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(written[name], tensor), name
    ids = sample_ids()
    assert torch.allclose(logits(load_model(out), ids), logits(load_model(source), ids), atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family,dense", HF_MOES)
def test_a_trained_moe_extracts_to_a_loadable_dense_model(family, dense, layout, moe, tmp_path, run_cli):
    source = moe(family, layout)
    out = tmp_path / "extracted"
    code, _, err = run_cli("extract", source, out, "--expert", 3)
    assert code == 0, err
    config = config_of(out)
    assert config["model_type"] == dense
    assert config["intermediate_size"] == arch.dimensions(arch.FAMILIES[family], config_of(source))["expert_ffn"]
    written = tensors(out)
    dense_family = arch.FAMILIES[dense]
    for layer in range(2):
        experts = expert_weights(source, layer)
        for role in ("gate", "up", "down"):
            assert torch.equal(written[dense_family.spec("ffn", role).name(layer)], experts[role][3])
    assert torch.isfinite(logits(load_model(out), sample_ids())).all()


def test_uniform_average_is_the_mean_of_the_experts_weights(moe, tmp_path, run_cli):
    source = moe("mixtral")
    out = tmp_path / "averaged"
    code, _, err = run_cli("extract", source, out, "--average", "uniform")
    assert code == 0, err
    assert "not of their outputs" in err
    written = tensors(out)
    for layer in range(2):
        experts = expert_weights(source, layer)
        for role in ("gate", "up", "down"):
            mean = sum(tensor * 0.25 for tensor in experts[role])
            assert torch.allclose(written[arch.FAMILIES["mistral"].spec("ffn", role).name(layer)], mean, atol=1e-7)
    load_model(out)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_frequency_average_weights_are_the_prune_scoring_frequencies(layout, moe, tmp_path, run_cli, token_file):
    source = moe("qwen3_moe", layout)
    scores = tmp_path / "scores.json"
    code, _, err = run_cli("prune", source, tmp_path / "pruned", "--keep", 3, "--criterion", "frequency",
                           "--calibration", token_file, "--save-scores", scores)
    assert code == 0, err
    out = tmp_path / "averaged"
    code, _, err = run_cli("extract", source, out, "--average", "frequency", "--calibration", token_file)
    assert code == 0, err
    frequencies = json.loads(scores.read_text())["layers"]
    with safe_open(str(sorted(out.glob("*.safetensors"))[0]), "pt") as handle:
        details = json.loads(handle.metadata()["surgery_extract"])
    written = tensors(out)
    for layer in range(2):
        weights = frequencies[str(layer)]["frequency"]
        assert details["layers"][str(layer)]["weights"] == weights
        experts = expert_weights(source, layer)
        for role in ("gate", "up", "down"):
            mean = sum(tensor * (w / sum(weights)) for w, tensor in zip(weights, experts[role]))
            assert torch.allclose(written[arch.FAMILIES["qwen3"].spec("ffn", role).name(layer)], mean, atol=1e-6)
    load_model(out)


# ------------------------------------------------------------------ shared experts and dense layers
def test_a_gated_shared_expert_needs_a_rule_and_nothing_is_written(moe, tmp_path, run_cli):
    out = tmp_path / "extracted"
    code, _, err = run_cli("extract", moe("qwen2_moe"), out, "--expert", 0)
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and "--shared-gate fold" in err and "--shared-gate drop" in err


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shared_expert_folded_at_half_reproduces_an_upcycled_qwen2_moe(layout, upcycled, tmp_path, run_cli):
    source, upcycled_moe = upcycled("qwen2", "qwen2_moe", layout, "--shared-expert")
    out = tmp_path / "extracted"
    code, _, err = run_cli("extract", upcycled_moe, out, "--expert", 1, "--shared-gate", "fold")
    assert code == 0, err
    assert config_of(out)["intermediate_size"] == 2 * 44
    written, stored = tensors(out), tensors(upcycled_moe)
    shared = arch.FAMILIES["qwen2_moe"].spec("shared_expert", "down").name(0)
    assert torch.equal(written["model.layers.0.mlp.down_proj.weight"][:, 44:], stored[shared] * 0.5)
    ids = sample_ids()
    assert torch.allclose(logits(load_model(out), ids), logits(load_model(source), ids), atol=1e-5)


def test_shared_expert_dropped_leaves_the_routed_experts_ffn(moe, tmp_path, run_cli):
    source = moe("qwen2_moe")
    out = tmp_path / "extracted"
    code, _, err = run_cli("extract", source, out, "--expert", 1, "--shared-gate", "drop")
    assert code == 0, err
    assert config_of(out)["intermediate_size"] == 12 and "left out" in err
    assert torch.equal(tensors(out)["model.layers.1.mlp.up_proj.weight"], expert_weights(source, 1)["up"][1])
    load_model(out)


def test_an_ungated_shared_expert_is_folded_exactly(upcycled, tmp_path, run_cli):
    source, upcycled_moe = upcycled("granite", "granitemoeshared", "fused", "--shared-expert")
    out = tmp_path / "extracted"
    code, _, err = run_cli("extract", upcycled_moe, out, "--expert", 0)
    assert code == 0, err
    assert config_of(out)["model_type"] == "granite" and config_of(out)["intermediate_size"] == 2 * 44
    ids = sample_ids()
    assert torch.allclose(logits(load_model(out), ids), logits(load_model(source), ids), atol=1e-5)


def test_dense_layers_are_copied_and_padded_to_the_extracted_size(moe, tmp_path, run_cli):
    source = moe("qwen2_moe", mlp_only_layers=[0])
    out = tmp_path / "extracted"
    code, _, err = run_cli("extract", source, out, "--expert", 2, "--shared-gate", "fold")
    assert code == 0, err
    assert config_of(out)["intermediate_size"] == 44  # the dense layer's FFN; layer 1's is 12 + 20 shared neurons
    written, stored = tensors(out), tensors(source)
    assert torch.equal(written["model.layers.0.mlp.gate_proj.weight"], stored["model.layers.0.mlp.gate_proj.weight"])
    down = written["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(down[:, :12], expert_weights(source, 1)["down"][2])
    assert not down[:, 32:].any()
    load_model(out)


# ------------------------------------------------------------------ refusals
def test_a_dense_model_is_refused(tmp_path, run_cli):
    source, out = save_model(tmp_path / "llama", "llama"), tmp_path / "extracted"
    run_cli("--version")  # clears what saving printed
    code, _, err = run_cli("extract", source, out, "--expert", 0)
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and "extract needs an MoE checkpoint" in err and "LlamaForCausalLM" in err


def test_an_expert_index_out_of_range_is_refused(moe, tmp_path, run_cli):
    out = tmp_path / "extracted"
    code, _, err = run_cli("extract", moe("mixtral"), out, "--expert", 4)
    assert code == 2 and not out.exists()
    assert err == "surgery: error: --expert 4: the source has experts 0-3 per MoE layer\n"


def test_expert_and_average_are_exclusive(moe, tmp_path, run_cli):
    code, _, err = run_cli("extract", moe("mixtral"), tmp_path / "x", "--expert", 0, "--average", "uniform")
    assert code == 2 and err == "surgery: error: give one of --expert E and --average uniform|frequency\n"


def test_the_api_call_is_the_command(moe, tmp_path):
    import surgery

    result = surgery.extract(moe("mixtral"), tmp_path / "x", expert=1)
    assert result.written and result.plan.details["extract"]["dense_family"] == "mistral"
