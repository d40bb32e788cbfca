"""`surgery prune`: MoE -> MoE keeping the best-scored routed experts of every MoE layer."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import load_model, logits, sample_ids, save_model, tensors

from surgery import families as arch

MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "flex_olmo", "granitemoe"]
LAYOUTS = ["per-expert", "fused"]


def metadata(directory):
    path = sorted(directory.glob("*.safetensors"))[0]
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def experts_of(directory, family_name, layer):
    """[the expert tensors of `layer`, one list of (role, tensor) per expert], whatever the stored layout."""
    config = json.loads((directory / "config.json").read_text())
    family = arch.detect_family(config)
    stored = tensors(directory)
    layout = arch.detect_expert_layout(family, stored)
    count = arch.dimensions(family, config)["experts"]
    if layout == "per_expert":
        return [[(spec.role, stored[spec.name(layer, e)]) for spec in family.experts] for e in range(count)]
    return [[(spec.role, stored[spec.name(layer)][e]) for spec in family.fused_experts] for e in range(count)]


def router_of(directory, layer):
    config = json.loads((directory / "config.json").read_text())
    family = arch.detect_family(config)
    stored = tensors(directory)
    for spec in (family.router, family.fused_router):
        if spec is not None and spec.name(layer) in stored:
            return stored[spec.name(layer)]
    raise AssertionError(f"no router of layer {layer} in {directory}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_prune_keeps_the_chosen_experts_byte_for_byte(family, layout, moe, tmp_path, run_cli, token_file):
    source = moe(family, layout)
    out = tmp_path / "pruned"
    code, _, err = run_cli("prune", source, out, "--keep", 3, "--criterion", "frequency", "--calibration", token_file)
    assert code == 0, err
    details = json.loads(metadata(out)["surgery_prune"])
    config = json.loads((out / "config.json").read_text())
    family_record = arch.detect_family(config)
    assert arch.dimensions(family_record, config)["experts"] == 3
    for layer, entry in details["layers"].items():
        layer = int(layer)
        assert len(entry["kept"]) == 3 and sorted(entry["kept"] + entry["dropped"]) == [0, 1, 2, 3]
        before, after = experts_of(source, family, layer), experts_of(out, family, layer)
        for new, old in enumerate(entry["kept"]):
            for (role, written), (_, original) in zip(after[new], before[old]):
                assert torch.equal(written, original), (layer, new, role)
        assert torch.equal(router_of(out, layer), router_of(source, layer)[entry["kept"]])
    load_model(out)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_ratio_zero_reproduces_the_source_logits_exactly(family, moe, tmp_path, run_cli, token_file):
    source = moe(family)
    out = tmp_path / "pruned"
    code, _, err = run_cli("prune", source, out, "--ratio", 0, "--criterion", "reap", "--calibration", token_file)
    assert code == 0, err
    assert "every one of the 4 experts is kept" in err
    ids = sample_ids()
    assert torch.equal(logits(load_model(out), ids), logits(load_model(source), ids))


def test_qwen2_moe_keeps_its_shared_expert(moe, tmp_path, run_cli, token_file):
    source = moe("qwen2_moe")
    out = tmp_path / "pruned"
    assert run_cli("prune", source, out, "--keep", 2, "--criterion", "activation", "--calibration", token_file)[0] == 0
    before, after = tensors(source), tensors(out)
    shared = [name for name in before if "shared_expert" in name]
    assert shared and all(torch.equal(after[name], before[name]) for name in shared)


def never_winning(directory):
    """A top-1 Mixtral whose routers send every token to expert 0 or 2: their rows are v and -v, the rows of
    experts 1 and 3 are zero, so one of the first two always has a logit |v.x| above 0."""
    from safetensors.torch import save_file

    stored = tensors(directory)
    config = json.loads((directory / "config.json").read_text())
    record = arch.detect_family(config)
    for layer in range(config["num_hidden_layers"]):
        name = record.router.name(layer)
        rows = torch.zeros_like(stored[name])
        rows[0], rows[2] = stored[name][0], -stored[name][0]
        stored[name] = rows
    save_file(stored, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def test_frequency_drops_experts_the_router_never_chooses(tmp_path, run_cli, token_file):
    source = never_winning(save_model(tmp_path / "mixtral", "mixtral", num_experts_per_tok=1))
    out = tmp_path / "pruned"
    code, _, err = run_cli("prune", source, out, "--keep", 2, "--criterion", "frequency", "--calibration", token_file)
    assert code == 0, err
    details = json.loads(metadata(out)["surgery_prune"])
    assert {layer: entry["kept"] for layer, entry in details["layers"].items()} == {"0": [0, 2], "1": [0, 2]}
    assert all(entry["scores"][1] == entry["scores"][3] == 0 for entry in details["layers"].values())


def test_under_reap_an_expert_no_token_reaches_scores_0_and_goes_first(tmp_path, run_cli, token_file):
    source = never_winning(save_model(tmp_path / "mixtral", "mixtral", num_experts_per_tok=1))
    out = tmp_path / "pruned"
    code, _, err = run_cli("prune", source, out, "--keep", 2, "--criterion", "reap", "--calibration", token_file)
    assert code == 0, err
    details = json.loads(metadata(out)["surgery_prune"])
    assert {layer: entry["kept"] for layer, entry in details["layers"].items()} == {"0": [0, 2], "1": [0, 2]}
    assert all(entry["scores"][1] == entry["scores"][3] == 0 for entry in details["layers"].values())
    assert "no calibration token reached some experts (layer 0: 2, layer 1: 2); they score 0 under reap" in err


def test_reap_is_the_mean_gate_weight_times_output_norm_over_routed_tokens(tmp_path, run_cli, token_file):
    """Scores measured independently: hooks on transformers' own experts module see the routing it is given."""
    source = save_model(tmp_path / "mixtral", "mixtral")
    scores_file = tmp_path / "scores.json"
    code, _, err = run_cli("prune", source, tmp_path / "out", "--keep", 2, "--calibration", token_file,
                           "--save-scores", scores_file, "--dry-run")
    assert code == 0, err
    saved = json.loads(scores_file.read_text())
    model = load_model(source)
    ids = torch.tensor([json.loads(line) for line in token_file.read_text().splitlines()])
    seen = {}

    def hook(layer):
        def capture(module, args):
            hidden, index, weights = args
            reap, norm, count = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), torch.zeros(4)
            for expert in range(4):
                token, slot = (index == expert).nonzero(as_tuple=True)
                one = module.forward(hidden[token], torch.full((len(token), 1), expert), torch.ones(len(token), 1))
                norms = one.norm(dim=-1).double()
                reap[expert], norm[expert], count[expert] = (weights[token, slot].double() * norms).sum(), norms.sum(), len(token)
            seen[layer] = (reap / count, norm / count, count / hidden.shape[0])
        return capture

    handles = [layer.mlp.experts.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    for layer, (reap, activation, frequency) in seen.items():
        entry = saved["layers"][str(layer)]
        assert entry["reap"] == pytest.approx(reap.tolist(), rel=1e-4)
        assert entry["activation"] == pytest.approx(activation.tolist(), rel=1e-4)
        assert entry["frequency"] == pytest.approx(frequency.tolist(), rel=1e-6)


def test_saved_scores_make_a_dry_run_that_writes_nothing(tmp_path, run_cli, token_file):
    source = save_model(tmp_path / "qwen3_moe", "qwen3_moe")
    scores_file, first, second = tmp_path / "scores.json", tmp_path / "first", tmp_path / "second"
    code, _, err = run_cli("prune", source, first, "--keep", 2, "--calibration", token_file, "--save-scores", scores_file)
    assert code == 0, err
    code, out, err = run_cli("prune", source, second, "--keep", 2, "--scores", scores_file, "--dry-run", "--json")
    assert code == 0, err
    assert not second.exists() and f"saved by an earlier run in {scores_file}" in err
    plan = json.loads(out)
    assert plan["prune"] == json.loads(metadata(first)["surgery_prune"])
    assert set(plan["prune"]["layers"]["0"]) == {"kept", "dropped", "scores"}


def test_json_names_scores_and_kept_and_dropped_experts_per_layer(tmp_path, run_cli):
    source = save_model(tmp_path / "mixtral", "mixtral")
    code, out, err = run_cli("prune", source, tmp_path / "out", "--keep", 2, "--criterion", "random", "--seed", 5,
                             "--dry-run", "--json")
    assert code == 0, err
    prune = json.loads(out)["prune"]
    assert prune["criterion"] == "random" and prune["seed"] == 5 and prune["calibration"] is None
    for entry in prune["layers"].values():
        ranked = sorted(range(4), key=lambda e: -entry["scores"][e])
        assert entry["kept"] == sorted(ranked[:2]) and entry["dropped"] == sorted(ranked[2:])


def test_model_card_lists_kept_and_dropped_experts(tmp_path, run_cli):
    source = save_model(tmp_path / "mixtral", "mixtral")
    out = tmp_path / "out"
    assert run_cli("prune", source, out, "--keep", 3, "--criterion", "random")[0] == 0
    card = (out / "README.md").read_text()
    details = json.loads(metadata(out)["surgery_prune"])
    for layer, entry in details["layers"].items():
        assert f"| {layer} | {', '.join(map(str, entry['kept']))} | {entry['dropped'][0]} |" in card


def test_ratio_below_top_k_clamps_the_top_k_with_a_note(tmp_path, run_cli):
    source = save_model(tmp_path / "mixtral", "mixtral")
    out = tmp_path / "out"
    code, _, err = run_cli("prune", source, out, "--ratio", 0.75, "--criterion", "random")
    assert code == 0, err
    assert "top-k clamped from 2 to 1" in err
    config = json.loads((out / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (1, 1)
    load_model(out)


def test_top_k_option_sets_the_output_top_k(tmp_path, run_cli):
    source = save_model(tmp_path / "qwen3_moe", "qwen3_moe")
    out = tmp_path / "out"
    assert run_cli("prune", source, out, "--keep", 1, "--top-k", 1, "--criterion", "random")[0] == 0
    config = json.loads((out / "config.json").read_text())
    dims = arch.dimensions(arch.detect_family(config), config)
    assert (dims["experts"], dims["top_k"]) == (1, 1)


@pytest.mark.parametrize("args, fragment", [
    (("--keep", 5), "--keep 5: must be below the source's 4 experts per MoE layer (--ratio 0 keeps them all)"),
    (("--keep", 4), "--keep 4: must be below the source's 4 experts per MoE layer (--ratio 0 keeps them all)"),
    (("--keep", 1), "--keep 1 is below the source's top-k (2): give --top-k K"),
    (("--keep", 2, "--top-k", 3), "--top-k 3 exceeds the 2 experts kept per layer"),
    (("--ratio", 1), "--ratio 1.0: expected 0 <= R < 1"),
    (("--keep", 0), "--keep 0: expected at least 1"),
    (("--keep", 2, "--ratio", 0.5), "give one of --keep N and --ratio R"),
    ((), "give one of --keep N and --ratio R"),
])
def test_bad_counts_are_refused_and_nothing_is_written(args, fragment, tmp_path, run_cli):
    source = save_model(tmp_path / "mixtral", "mixtral")
    out = tmp_path / "out"
    code, _, err = run_cli("prune", source, out, *args, "--criterion", "random")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"surgery: error: {fragment}")
    assert not out.exists()


def test_a_dense_model_is_refused(tmp_path, run_cli):
    source = save_model(tmp_path / "llama", "llama")
    code, _, err = run_cli("prune", source, tmp_path / "out", "--keep", 2, "--criterion", "random")
    assert code == 2
    assert "prune needs an MoE checkpoint; this is a LlamaForCausalLM (dense)" in err
    assert not (tmp_path / "out").exists()


def test_scores_of_another_model_are_refused(tmp_path, run_cli, token_file):
    mixtral = save_model(tmp_path / "mixtral", "mixtral")
    qwen = save_model(tmp_path / "qwen3_moe", "qwen3_moe", num_experts=6)
    scores_file = tmp_path / "scores.json"
    assert run_cli("prune", mixtral, tmp_path / "a", "--keep", 2, "--calibration", token_file,
                   "--save-scores", scores_file)[0] == 0
    code, _, err = run_cli("prune", qwen, tmp_path / "b", "--keep", 2, "--scores", scores_file)
    assert code == 2
    assert "of 4 experts; the source has MoE layers [0, 1] of 6 experts" in err


def test_python_api(tmp_path, token_file):
    import surgery

    source = save_model(tmp_path / "mixtral", "mixtral")
    result = surgery.prune(source, tmp_path / "out", keep=3, criterion="frequency", calibration=str(token_file))
    assert result.written and result.config["num_local_experts"] == 3
    assert set(result.plan.details["prune"]["layers"]) == {0, 1}
