"""`surgery extract` on the MoE families users prune: DeepSeek-V3/V2, GLM-4.5 and ERNIE 4.5 become the same family
with every layer dense (transformers has no dense counterpart that holds their tensors); gpt-oss, OLMoE, Phi-3.5-MoE
and MiniMax-M2 have no dense form in transformers and are refused in one line."""

import json

import pytest
import torch
from tiny_models import add_mtp_layer, build_model, load_model, logits, sample_ids, save_model, tensors

from surgery import families as arch

ALL_DENSE = ["deepseek_v3", "glm4_moe", "ernie4_5_moe"]
REFUSED = ["gpt_oss", "olmoe", "phimoe", "minimax_m2", "qwen3_5_moe_text"]


def config_of(directory):
    return json.loads((directory / "config.json").read_text())


def layer_experts(model, layer):
    """(gate, up, down) of every routed expert of one MoE layer, from transformers' fused in-memory tensors."""
    experts = model.model.layers[layer].mlp.experts
    gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)
    return gate, up, experts.down_proj.detach()


def save(directory, model):
    """Save `model` as save_model does (with the hub MTP layer where its config has one)."""
    model.save_pretrained(directory)
    if getattr(model.config, "num_nextn_predict_layers", None):
        add_mtp_layer(directory, model)
    return directory


@pytest.fixture
def extract(tmp_path, run_cli):
    def run(source, *options):
        out = tmp_path / "extracted"
        code, _, err = run_cli("extract", source, out, *options)
        assert code == 0, err
        return out, err
    return run


@pytest.mark.parametrize("family", ALL_DENSE + ["qwen3_next"])
def test_the_extract_is_the_same_architecture_with_every_layer_dense(family, tmp_path, extract):
    source = save_model(tmp_path / family, family)
    out, _ = extract(source, "--expert", 0, "--shared-gate", "fold")
    config = config_of(out)
    assert config["architectures"] == config_of(source)["architectures"]
    assert arch.moe_layers(arch.detect_family(config), config) == []
    model = load_model(out)  # strict: no missing or unexpected key
    assert all(not hasattr(layer.mlp, "experts") for layer in model.model.layers)
    assert torch.isfinite(logits(model, sample_ids())).all()


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_the_mtp_layer_and_the_routers_are_left_out(family, tmp_path, extract):
    source = save_model(tmp_path / family, family)
    out, err = extract(source, "--expert", 0, "--shared-gate", "fold")
    assert config_of(out)["num_nextn_predict_layers"] == 0 and "multi-token-prediction tensors are left out" in err
    written = tensors(out)
    assert not any(name.startswith("model.layers.2.") for name in written)  # the MTP layer
    assert not any(".mlp.gate." in name or "e_score_correction_bias" in name for name in written)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_the_dense_ffn_is_expert_rows_then_shared_rows_then_zero_neurons(family, tmp_path, extract):
    model = build_model(family)
    source = save(tmp_path / family, model)
    out, _ = extract(source, "--expert", 3, "--shared-gate", "fold")
    scale = model.config.routed_scaling_factor  # DeepSeek-V3's default 2.5, GLM-4.5's 1.0
    assert config_of(out)["intermediate_size"] == 44  # layer 0's dense FFN; layer 1's: 12 routed + 12 shared
    written, stored = tensors(out), tensors(source)
    for role in ("gate", "up", "down"):
        name = f"model.layers.0.mlp.{role}_proj.weight"
        assert torch.equal(written[name], stored[name])  # the dense layer: byte copies
    gate, up, down = layer_experts(model, 1)
    shared = model.model.layers[1].mlp.shared_experts
    for role, expert in (("gate", gate[3]), ("up", up[3])):
        rows = written[f"model.layers.1.mlp.{role}_proj.weight"]
        assert torch.equal(rows[:12], expert)
        assert torch.equal(rows[12:24], getattr(shared, f"{role}_proj").weight.detach())
        assert not rows[24:].any()
    columns = written["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(columns[:, :12], down[3] * scale)  # the routed part, scaled by routed_scaling_factor
    assert torch.equal(columns[:, 12:24], shared.down_proj.weight.detach())
    assert not columns[:, 24:].any()


@pytest.mark.parametrize("family", ALL_DENSE)
def test_an_moe_of_identical_experts_extracts_to_the_same_logits(family, tmp_path, extract):
    """Experts all copies of one FFN, top-k weights renormalised (their sum times routed_scaling_factor, 2.5 for
    DeepSeek-V3, is a constant the dense down_proj carries), shared experts folded: the extract computes the MoE."""
    model = build_model(family, norm_topk_prob=True) if family != "ernie4_5_moe" else build_model(family)
    with torch.no_grad():
        for layer in model.model.layers:
            experts = getattr(layer.mlp, "experts", None)
            if experts is not None:
                experts.gate_up_proj.copy_(experts.gate_up_proj[:1].expand_as(experts.gate_up_proj))
                experts.down_proj.copy_(experts.down_proj[:1].expand_as(experts.down_proj))
    source = save(tmp_path / family, model)
    out, err = extract(source, "--expert", 5 if family != "ernie4_5_moe" else 2)
    assert "the MoE's output where its experts are identical" in err
    ids = sample_ids()
    assert torch.allclose(logits(load_model(out), ids), logits(load_model(source), ids), atol=1e-5)


@pytest.mark.parametrize("family", ["deepseek_v3", "ernie4_5_moe"])
def test_both_stored_layouts_extract_to_the_same_bytes(family, tmp_path, run_cli):
    source = save_model(tmp_path / family, family)
    written = []
    for layout in ("per-expert", "fused"):
        stored, out = tmp_path / f"stored-{layout}", tmp_path / f"extracted-{layout}"
        code, _, err = run_cli("copy", source, stored, "--layout", layout)
        assert code == 0, err
        code, _, err = run_cli("extract", stored, out, "--expert", 2)
        assert code == 0, err
        written.append(tensors(out))
    assert sorted(written[0]) == sorted(written[1])
    assert all(torch.equal(written[0][name], written[1][name]) for name in written[0])


def test_the_averaged_ffn_is_scaled_by_routed_scaling_factor(tmp_path, extract):
    model = build_model("deepseek_v3")
    out, _ = extract(save(tmp_path / "ds", model), "--average", "uniform", "--shared-gate", "drop")
    assert config_of(out)["intermediate_size"] == 44
    _, _, down = layer_experts(model, 1)
    mean = sum(tensor * 0.125 for tensor in down)
    assert torch.allclose(tensors(out)["model.layers.1.mlp.down_proj.weight"][:, :12], mean * 2.5, atol=1e-7)


def test_ernie_keeps_its_lm_head_bias_and_folds_the_shared_experts_biases(tmp_path, extract):
    model = build_model("ernie4_5_moe")  # use_bias: biases on every projection and on lm_head
    source = save(tmp_path / "ernie", model)
    out, _ = extract(source, "--expert", 1)
    assert config_of(out)["moe_layer_start_index"] == 2 and config_of(out)["architectures"] == ["Ernie4_5_MoeForCausalLM"]
    written, stored = tensors(out), tensors(source)
    assert torch.equal(written["lm_head.bias"], stored["lm_head.bias"])
    shared = model.model.layers[1].mlp.shared_experts
    gate_bias = written["model.layers.1.mlp.gate_proj.bias"]
    assert not gate_bias[:12].any()  # the routed expert has no bias
    assert torch.equal(gate_bias[12:24], shared.gate_proj.bias.detach()) and not gate_bias[24:].any()
    assert torch.equal(written["model.layers.1.mlp.down_proj.bias"], shared.down_proj.bias.detach())
    load_model(out)


def test_deepseek_v2_says_its_unnormalised_weights_make_it_inexact(tmp_path, extract):
    out, err = extract(save_model(tmp_path / "v2", "deepseek_v2"), "--expert", 0)
    assert "not renormalised (DeepseekV2ForCausalLM's router never does)" in err
    load_model(out)


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("family", REFUSED)
def test_a_family_without_a_dense_form_is_refused_in_one_line(family, tmp_path, run_cli):
    source, out = save_model(tmp_path / family, family), tmp_path / "extracted"
    run_cli("--version")  # clears what saving printed
    code, stdout, err = run_cli("extract", source, out, "--expert", 0)
    assert code == 2 and not out.exists() and not stdout
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"extract: a {arch.FAMILIES[family].architecture} has no dense form in transformers (" in err


def test_an_extract_with_no_moe_layer_left_is_refused(tmp_path, extract, run_cli):
    first, _ = extract(save_model(tmp_path / "glm", "glm4_moe"), "--expert", 0)
    code, _, err = run_cli("extract", first, tmp_path / "again", "--expert", 0)
    assert code == 2 and not (tmp_path / "again").exists()
    assert "has no MoE layer; every layer is dense already" in err
