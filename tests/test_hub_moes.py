"""The MoE families users prune (DeepSeek-V3/V2, GLM-4.5, gpt-oss, MiniMax-M2, ERNIE 4.5, OLMoE, Phi-3.5-MoE), each a
tiny checkpoint built and saved by transformers' own class (with the MTP layer hub checkpoints store): run layer by
layer, validated, pruned, copied and inspected like the families we build."""

import json

import pytest
import torch
from tiny_models import HUB_MOES, build_model, load_model, logits, sample_ids, save_model, tensors

import surgery
from surgery import families as arch
from surgery.execution.batches import batches as make_batches
from surgery.execution.layer_pass import LayerPass
from surgery.execution.placement import Placement
from surgery.execution.settings import MemoryBudget
from surgery.execution.weights import ModelWeights
from surgery.io.checkpoint import Checkpoint

ROWS = [list(range(3, 15)), list(range(20, 27)), [5, 80, 81, 7], list(range(40, 52))]  # padding in two rows


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    built = {}

    def get(family):
        if family not in built:
            built[family] = save_model(root / family, family, seed=3)
        return built[family]
    return get


def batches():
    return list(make_batches(ROWS, 3, 12, 0))


def family_of(directory):
    config = json.loads((directory / "config.json").read_text())
    return arch.detect_family(config), config


def per_expert_tensors(directory, layer):
    """{role: [E, ...] stacked per-expert tensors, router tensors by role} of one MoE layer, whatever the layout."""
    family, config = family_of(directory)
    stored = tensors(directory)
    layout = arch.detect_expert_layout(family, stored)
    count = arch.dimensions(family, config)["experts"]
    if layout == "fused":
        out = {spec.role: stored[spec.name(layer)] for spec in family.fused_experts}
    else:
        out = {spec.role: torch.stack([stored[spec.name(layer, e)] for e in range(count)]) for spec in family.experts}
    for spec in arch.router_specs(family, layout):
        value = stored[spec.name(layer)]
        out["router/" + spec.role] = value if spec.shape[0] == "experts" else value.transpose(0, -1)
    return out


@pytest.mark.parametrize("family", HUB_MOES)
def test_layer_by_layer_logits_equal_the_whole_model_bit_for_bit(hub, family):
    directory = hub(family)
    with Checkpoint.open(directory) as checkpoint:
        layer_pass = LayerPass(ModelWeights.from_checkpoint(checkpoint), batches(), Placement.resolve("cpu"),
                               MemoryBudget.parse(None))
        out = {}
        layer_pass.head(layer_pass.forward(), lambda index, part, value, extra: out.setdefault(index, []).append(value))
    model = load_model(directory)
    for index, batch in enumerate(batches()):
        with torch.no_grad():
            expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        real = batch.attention_mask.bool()
        assert torch.equal(torch.cat(out[index])[real], expected[real]), family


@pytest.mark.parametrize("family", HUB_MOES)
def test_streamed_validation_equals_the_whole_model_pass(hub, family, token_file):
    directory = hub(family)
    whole = surgery.validate(directory, tokens=str(token_file), stream=False)
    streamed = surgery.validate(directory, tokens=str(token_file), stream=True)
    assert abs(whole["loss"] - streamed["loss"]) <= 1e-5
    for mine, theirs in zip(streamed["routing"], whole["routing"]):
        assert mine["layer"] == theirs["layer"]
        assert max(abs(a - b) for a, b in zip(mine["share"], theirs["share"])) <= 1e-5


@pytest.mark.parametrize("family", HUB_MOES)
def test_prune_ratio_zero_reproduces_the_source_logits_exactly(hub, family, tmp_path, run_cli, token_file):
    source = hub(family)
    code, _, err = run_cli("prune", source, tmp_path / "out", "--ratio", 0, "--calibration", token_file)
    assert code == 0, err
    ids = sample_ids()
    assert torch.equal(logits(load_model(tmp_path / "out"), ids), logits(load_model(source), ids))


@pytest.mark.parametrize("family", HUB_MOES)
def test_prune_half_keeps_byte_copies_of_the_kept_experts_and_every_router_tensor(hub, family, tmp_path, run_cli,
                                                                                  token_file):
    source = hub(family)
    record, config = family_of(source)
    experts = arch.dimensions(record, config)["experts"]
    code, _, err = run_cli("prune", source, tmp_path / "out", "--keep", experts // 2, "--calibration", token_file)
    assert code == 0, err
    out_family, out_config = family_of(tmp_path / "out")
    assert arch.dimensions(out_family, out_config)["experts"] == experts // 2
    layers = arch.moe_layers(record, config)
    assert layers and arch.moe_layers(out_family, out_config) == layers
    details = json.loads((tmp_path / "out" / "surgery-manifest.json").read_text()).get("details", {}).get("prune") \
        or surgery.inspect(tmp_path / "out").to_json()  # the model card and metadata hold the same choice
    card = (tmp_path / "out" / "README.md").read_text()
    for layer in layers:
        kept = [int(v) for v in card.split(f"\n| {layer} | ")[1].split(" |")[0].split(", ")]
        before, after = per_expert_tensors(source, layer), per_expert_tensors(tmp_path / "out", layer)
        assert before.keys() == after.keys()
        for role, value in before.items():
            assert torch.equal(after[role], value[kept]), (layer, role)
    model = load_model(tmp_path / "out")  # strict: no missing or unexpected key
    assert torch.isfinite(logits(model, sample_ids())).all()
    assert details is not None


@pytest.mark.parametrize("family", HUB_MOES)
def test_copy_layout_round_trips_byte_for_byte(hub, family, tmp_path, run_cli):
    source = hub(family)
    record, _ = family_of(source)
    if len(record.stored_layouts) < 2:
        pytest.skip(f"{family} stores its experts fused only")
    assert run_cli("copy", source, tmp_path / "fused", "--layout", "fused")[0] == 0
    assert run_cli("copy", tmp_path / "fused", tmp_path / "back", "--layout", "per-expert")[0] == 0
    first, back = tensors(source), tensors(tmp_path / "back")
    assert first.keys() == back.keys() and all(torch.equal(first[n], back[n]) for n in first)
    ids = sample_ids()
    assert torch.equal(logits(load_model(tmp_path / "fused"), ids), logits(load_model(source), ids))


@pytest.mark.parametrize("family", HUB_MOES)
def test_inspect_counts_the_parameters_transformers_counts(hub, family):
    """Every weight transformers' model holds: its parameters and saved buffers (a score-correction bias), tied
    weights once; the MTP layer it does not hold is counted apart."""
    report = surgery.inspect(hub(family))
    model = build_model(family)
    unique = {value.data_ptr(): value.numel() for value in model.state_dict().values()}
    assert report.parameters == sum(unique.values())
    assert not report.problems


def test_prune_leaves_out_the_mtp_layer_and_says_so(hub, tmp_path, run_cli, token_file):
    source = hub("deepseek_v3")
    assert any(name.startswith("model.layers.2.") for name in tensors(source))  # the tiny model's MTP layer
    code, _, err = run_cli("prune", source, tmp_path / "out", "--keep", 4, "--criterion", "frequency",
                           "--calibration", token_file)
    assert code == 0, err
    assert "multi-token-prediction" in err and "num_nextn_predict_layers: 0" in err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert not any(name.startswith("model.layers.2.") for name in tensors(tmp_path / "out"))


def test_group_limited_routing_keeps_the_same_number_of_experts_in_every_group(hub, tmp_path, run_cli, token_file):
    source = hub("deepseek_v3")  # 8 experts in n_group 2 groups, topk_group 1, top-2
    code, _, err = run_cli("prune", source, tmp_path / "out", "--keep", 4, "--calibration", token_file)
    assert code == 0, err
    card = (tmp_path / "out" / "README.md").read_text()
    kept = [int(v) for v in card.split("\n| 1 | ")[1].split(" |")[0].split(", ")]
    assert sum(e < 4 for e in kept) == sum(e >= 4 for e in kept) == 2


@pytest.mark.parametrize("keep, fragment", [
    (5, "--keep 5: n_group = 2, and every group must keep the same number of experts (routing picks groups first); "
        "keep a multiple of 2 (4 or 6)"),
    (2, "keeping 2 of 8 experts leaves 1 per group (n_group = 2); a group's routing score sums its top-2, so each "
        "group must keep at least 2 (4 experts)"),
])
def test_group_rules_that_cannot_hold_are_refused_with_the_numbers(hub, tmp_path, run_cli, keep, fragment):
    code, _, err = run_cli("prune", hub("deepseek_v3"), tmp_path / "out", "--keep", keep, "--top-k", 1,
                           "--criterion", "random")
    assert code != 0 and fragment in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("criterion", ["reap", "frequency", "activation", "random"])
def test_every_criterion_prunes_a_group_routed_moe_into_a_checkpoint_that_verifies(hub, tmp_path, run_cli, token_file,
                                                                                  criterion):
    out = tmp_path / "out"
    code, _, err = run_cli("prune", hub("deepseek_v3"), out, "--keep", 4, "--criterion", criterion,
                           "--calibration", token_file)
    assert code == 0, err
    assert run_cli("verify", out)[0] == 0
    model = load_model(out)
    assert model.config.n_routed_experts == 4 and model.config.n_group == 2


def test_copy_top_k_beyond_the_groups_a_token_may_use_is_refused(hub, tmp_path, run_cli):
    source = hub("deepseek_v3")  # topk_group 1 of 2 groups of 4: a token reaches at most 4 experts
    code, _, err = run_cli("copy", source, tmp_path / "out", "--top-k", 5)
    assert code != 0 and "--top-k 5: a token may use 1 of 2 expert groups (topk_group), 4 experts in all" in err
    assert run_cli("copy", source, tmp_path / "ok", "--top-k", 4)[0] == 0


@pytest.mark.parametrize("family", ["deepseek_v3", "minimax_m2", "ernie4_5_moe", "phimoe"])
def test_a_fused_checkpoint_prunes_to_the_same_experts_and_router_tensors(hub, family, tmp_path, run_cli):
    """Stored fused (transformers 5's names: MiniMax's `mlp.e_score_correction_bias`, ERNIE's
    `mlp.gate.moe_statics...`, Phi-3.5-MoE's `mlp.router`), pruned to per-expert: the same tensors as pruning the
    per-expert checkpoint."""
    source = hub(family)
    assert run_cli("copy", source, tmp_path / "fused", "--layout", "fused")[0] == 0
    for name, start in (("a", source), ("b", tmp_path / "fused")):
        code, _, err = run_cli("prune", start, tmp_path / name, "--keep", 4 if family == "deepseek_v3" else 2,
                               "--criterion", "random", "--layout", "per-expert")
        assert code == 0, err
    first, second = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)
