"""`surgery merge --non-ffn regmean`: attention and head weights fitted to each model's own inputs (RegMean)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_merge import TEXTS, save_member
from tiny_models import load_model, logits, sample_ids

from surgery.btx.card import ALPHA
from surgery.btx.regmean import merged_weight


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("regmean")
    paths = {name: save_member(root / name, seed=seed) for seed, name in enumerate(("a", "b"))}
    for name in ("a", "b"):
        (root / f"{name}.txt").write_text(TEXTS[name])
        paths[f"{name}.txt"] = root / f"{name}.txt"
    return paths


def merge_args(models, a="a", b="b"):
    return ["--expert", f"a={models[a]}", "--expert", f"b={models[b]}", "--calibration", f"a={models['a.txt']}",
            "--calibration", f"b={models['b.txt']}", "--non-ffn", "regmean", "--router-init", "zero"]


def test_the_formula_solves_the_regularised_least_squares():
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(50, 6, generator=generator, dtype=torch.float64) for _ in range(3)]
    weights = [torch.randn(4, 6, generator=generator) for _ in range(3)]
    grams = [x.T @ x for x in inputs]
    merged = merged_weight(grams, weights, alpha=0.7).double()
    # the gradient of sum_i ||X~_i (W - W_i)^T||^2 with G~_i = 0.7 G_i + 0.3 diag(G_i) vanishes at the result
    scaled = [0.7 * g + 0.3 * torch.diag(torch.diagonal(g)) for g in grams]
    gradient = sum(g @ (merged - w.double()).T for g, w in zip(scaled, weights))
    scale = sum(g @ w.double().T for g, w in zip(scaled, weights)).abs().max()
    assert gradient.abs().max() < 1e-6 * scale  # zero up to the float32 rounding of the result


def test_one_model_alone_comes_back_unchanged():
    weight = torch.randn(5, 3)
    gram = torch.randn(20, 3, dtype=torch.float64)
    assert torch.allclose(merged_weight([gram.T @ gram], [weight], ALPHA), weight, atol=1e-6)


def test_merging_copies_of_one_model_reproduces_it(tmp_path, run_cli, models):
    code, _, err = run_cli("merge", tmp_path / "out", *merge_args(models, "a", "a"))
    assert code == 0, err
    ids = sample_ids(96)
    assert torch.allclose(logits(load_model(tmp_path / "out"), ids), logits(load_model(models["a"]), ids), atol=1e-5)


def layer1_grams(models, merged=None) -> dict:
    """{"q": [G per model], "o": [...]}: Gram matrices of the inputs of layer 1's q_proj and o_proj, from hooks on
    each model's own transformers forward over its own text; with `merged` (a loaded merge), layer 1's input is
    replaced by the hidden states the merge gives at layer 1 (RegMean++'s inputs)."""
    from surgery.execution.calibration import CalibrationSet
    from surgery.execution.loading import load_tokenizer

    grams = {"q": [], "o": []}
    for name in ("a", "b"):
        model = load_model(models[name])
        calibration = CalibrationSet.from_text(TEXTS[name], load_tokenizer(models[name]), model.config.to_dict(),
                                               16384, name)
        sums, state = {"q": 0, "o": 0}, {}
        layer = model.model.layers[1]
        if merged is not None:
            layer.register_forward_pre_hook(lambda _m, args: (state["merged"], *args[1:]))
        for part, module in (("q", layer.self_attn.q_proj), ("o", layer.self_attn.o_proj)):
            def hook(_m, args, part=part):
                rows = args[0].reshape(-1, args[0].shape[-1])[state["mask"]].double()
                sums[part] = sums[part] + rows.T @ rows
            module.register_forward_pre_hook(hook)
        for batch in calibration.batches:
            with torch.no_grad():
                if merged is not None:
                    state["merged"] = merged(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                             output_hidden_states=True).hidden_states[1]
                state["mask"] = batch.attention_mask.reshape(-1).bool()
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        grams["q"].append(sums["q"])
        grams["o"].append(sums["o"])
    return grams


def assert_layer1_is_regmean(out_dir, models, grams):
    out = load_file(out_dir / "model.safetensors")
    sources = {name: load_file(models[name] / "model.safetensors") for name in ("a", "b")}
    for part in ("q", "k", "v", "o"):  # k and v read q's input: q's Gram matrices are theirs
        key = f"model.layers.1.self_attn.{part}_proj.weight"
        expected = merged_weight(grams["o" if part == "o" else "q"], [sources[name][key] for name in ("a", "b")],
                                 ALPHA)
        assert torch.allclose(out[key], expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(out[key], (sources["a"][key] + sources["b"][key]) / 2, atol=1e-3)  # not the mean


def test_q_and_o_are_the_regmean_of_each_models_own_inputs(tmp_path, run_cli, models):
    """Recompute layer 1's Gram matrices with hooks on transformers' own models, on the tokens the merge used."""
    assert run_cli("merge", tmp_path / "out", *merge_args(models))[0] == 0
    assert_layer1_is_regmean(tmp_path / "out", models, layer1_grams(models))


def token_counts(models, name):
    """Real-token counts of model `name`'s calibration text, tokenized as the merge does."""
    from surgery.execution.calibration import CalibrationSet
    from surgery.execution.loading import load_tokenizer

    config = json.loads((models[name] / "config.json").read_text())
    calibration = CalibrationSet.from_text(TEXTS[name], load_tokenizer(models["a"]), config, 16384, name)
    ids = torch.cat([b.input_ids[b.attention_mask.bool()] for b in calibration.batches])
    return torch.bincount(ids, minlength=config["vocab_size"]).double()


def test_a_projection_whose_input_is_not_q_s_is_refused_not_given_q_s_gram():
    from surgery.btx.regmean import _Gram, _SameInput

    gram = _Gram()
    gram(0, torch.ones(3, 4))
    _SameInput(gram, "self_attn.k_proj", "self_attn.q_proj")(0, torch.ones(3, 4))  # the same rows: nothing to do
    with pytest.raises(AssertionError, match="the input of self_attn.k_proj differs from that of self_attn.q_proj"):
        _SameInput(gram, "self_attn.k_proj", "self_attn.q_proj")(0, torch.zeros(3, 4))


def test_embedding_rows_are_weighted_by_each_models_token_counts(tmp_path, run_cli, models):
    """RegMean on one-hot inputs: G_i = diag(token counts of model i's text)."""
    assert run_cli("merge", tmp_path / "out", *merge_args(models))[0] == 0
    out = load_file(tmp_path / "out" / "model.safetensors")["model.embed_tokens.weight"]
    rows = [load_file(models[name] / "model.safetensors")["model.embed_tokens.weight"].double() for name in ("a", "b")]
    counts = [token_counts(models, name)[:, None] for name in ("a", "b")]
    total = counts[0] + counts[1]
    expected = torch.where(total > 0, (counts[0] * rows[0] + counts[1] * rows[1]) / total.clamp(min=1),
                           (rows[0] + rows[1]) / 2)
    assert torch.allclose(out.double(), expected, atol=1e-6)
    only_a = ((counts[0] > 0) & (counts[1] == 0)).reshape(-1)
    unused = (total == 0).reshape(-1)
    assert only_a.any() and unused.any()  # the texts exercise every case
    assert torch.allclose(out[only_a], rows[0][only_a].float(), atol=1e-6)


def test_norms_keep_the_mean_and_the_metadata_says_regmean(tmp_path, run_cli, models):
    assert run_cli("merge", tmp_path / "out", *merge_args(models))[0] == 0
    out = load_file(tmp_path / "out" / "model.safetensors")
    sources = [load_file(models[name] / "model.safetensors") for name in ("a", "b")]
    for key in ("model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.allclose(out[key], (sources[0][key] + sources[1][key]) / 2, atol=1e-6)
    from surgery.io.checkpoint import Checkpoint

    metadata = next(iter(Checkpoint.open(tmp_path / "out").metadata.values()))
    assert json.loads(metadata["surgery_non_ffn"])["method"].startswith(f"regmean (alpha {ALPHA}, each model's own inputs)")
    load_model(tmp_path / "out")


def test_the_alpha_merged_with_is_the_alpha_written(tmp_path, run_cli, models, monkeypatch):
    from surgery.btx import card
    from surgery.io.checkpoint import Checkpoint

    assert run_cli("merge", tmp_path / "default", *merge_args(models))[0] == 0
    monkeypatch.setattr(card, "ALPHA", 0.5)  # what bench/bench_regmean_alpha.py does
    code, out, _ = run_cli("merge", tmp_path / "half", *merge_args(models), "--dry-run")
    assert code == 0 and "alpha 0.5" in out and f"alpha {ALPHA}" not in out
    assert run_cli("merge", tmp_path / "half", *merge_args(models))[0] == 0
    metadata = next(iter(Checkpoint.open(tmp_path / "half").metadata.values()))
    assert json.loads(metadata["surgery_non_ffn"])["method"].startswith("regmean (alpha 0.5,")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(load_file(tmp_path / "half" / "model.safetensors")[key],
                              load_file(tmp_path / "default" / "model.safetensors")[key])


def test_regmean_without_an_experts_text_is_refused(tmp_path, run_cli, models):
    code, _, err = run_cli("merge", tmp_path / "out", "--expert", f"a={models['a']}", "--expert", f"b={models['b']}",
                           "--calibration", f"a={models['a.txt']}", "--non-ffn", "regmean")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "surgery: error: options: --non-ffn regmean fits the shared layers to each expert's own inputs and needs "
        "--calibration text for every expert (missing: b)")
    assert not (tmp_path / "out").exists()


def plus_args(models):
    return [arg if arg not in ("regmean", "zero") else {"regmean": "regmean++", "zero": "calibrated"}[arg]
            for arg in merge_args(models)]


def test_regmean_plus_plus_takes_each_layers_inputs_from_the_merged_model(tmp_path, run_cli, models):
    """Layer 1's q and o: each model's own layer 1 (its norm, its attention) run on the hidden states the merged
    output feeds layer 1 (transformers' own forward of the written model), on that model's text."""
    code, _, err = run_cli("merge", tmp_path / "out", *plus_args(models))
    assert code == 0, err
    assert_layer1_is_regmean(tmp_path / "out", models, layer1_grams(models, merged=load_model(tmp_path / "out")))


def test_regmean_plus_plus_differs_from_regmean(tmp_path, run_cli, models):
    """Their inputs differ from layer 0 on (the merged model's averaged embeddings, not each model's own)."""
    assert run_cli("merge", tmp_path / "plus", *plus_args(models))[0] == 0
    assert run_cli("merge", tmp_path / "own", *[a if a != "zero" else "calibrated" for a in merge_args(models)])[0] == 0
    plus, own = (load_file(tmp_path / name / "model.safetensors") for name in ("plus", "own"))
    key = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(plus[key], own[key], atol=1e-4)
    load_model(tmp_path / "plus")


def test_regmean_plus_plus_needs_calibrated_routers(tmp_path, run_cli, models):
    args = [a if a != "regmean" else "regmean++" for a in merge_args(models)]  # --router-init zero
    code, _, err = run_cli("merge", tmp_path / "out", *args)
    assert code == 2 and "--non-ffn regmean++" in err and "--router-init calibrated (got zero)" in err
    assert not (tmp_path / "out").exists()


def non_ffn_method(directory):
    from surgery.io.checkpoint import Checkpoint

    with Checkpoint.open(directory) as checkpoint:
        return json.loads(next(iter(checkpoint.metadata.values()))["surgery_non_ffn"])["method"]


def test_the_default_is_regmean_plus_plus_when_the_routers_are_calibrated(tmp_path, run_cli, models):
    args = ["--expert", f"a={models['a']}", "--expert", f"b={models['b']}"]
    texts = ["--calibration", f"a={models['a.txt']}", "--calibration", f"b={models['b.txt']}"]
    assert run_cli("merge", tmp_path / "calibrated", *args, *texts)[0] == 0  # --router-init auto: calibrated
    assert non_ffn_method(tmp_path / "calibrated").startswith(f"regmean++ (alpha {ALPHA}")
    assert run_cli("merge", tmp_path / "plain", *args)[0] == 0  # no texts: normal routers
    assert non_ffn_method(tmp_path / "plain") == "weighted mean (float32)"
