"""OLMo 2 -> FlexOlmo: upcycle, split and merge reproduce the dense model; calibration reads the residual stream.

OLMo 2 is post-norm: a decoder layer has no norm before attention or the FFN; each block's output is
normed and added to the residual stream. So FlexOlmo's MoE block, and its router, read the
post-attention residual stream itself (the `mlp` input), not a norm output, and the FFN's output
passes through post_feedforward_layernorm: a wrong expert is not hidden by a small FFN scale.

Exactness as elsewhere: strict loading with transformers (no missing or unexpected key), float32
logits within 1e-5 of the source's.
"""

import json

import pytest
import torch
from tiny_models import load_model, logits, router_inputs_by_hooks, sample_ids, save_model

from surgery import families as arch
from surgery.execution.calibration import CalibrationSet
from surgery.execution.routers.registry import make
from surgery.execution.routers.request import RouterRequest
from surgery.io.checkpoint import Checkpoint
from surgery.seeds import sklearn_state

EXACT = 1e-5
ROWS = [list(range(3, 15)), list(range(20, 27)), [5, 80, 81, 7], list(range(40, 52))]  # padding in two rows


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("olmo2") / "src", "olmo2", seed=1)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    generator = torch.Generator().manual_seed(3)
    path = tmp_path_factory.mktemp("calibration") / "ids.jsonl"
    path.write_text("".join(json.dumps(torch.randint(3, 96, (40,), generator=generator).tolist()) + "\n"
                            for _ in range(8)))
    return path


_SOURCE_LOGITS = {}


def max_difference(source, out) -> float:
    ids = sample_ids()
    if str(source) not in _SOURCE_LOGITS:
        _SOURCE_LOGITS[str(source)] = logits(load_model(source), ids)
    return float((_SOURCE_LOGITS[str(source)] - logits(load_model(out), ids)).abs().max())


def surgery(run_cli, *args) -> str:
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr
    return " ".join((stdout + stderr).split())  # rich wraps long lines


def config_of(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def tensors_of(directory) -> dict:
    with Checkpoint.open(directory) as checkpoint:
        return {name: checkpoint.read(name) for name in checkpoint.tensors}


# ------------------------------------------------------------------ the pair
def test_olmo2_becomes_flex_olmo_by_default_and_only():
    olmo2 = arch.FAMILIES["olmo2"]
    assert olmo2.default_target == "flex_olmo" and set(olmo2.conversions) == {"flex_olmo"}
    assert olmo2.router_input == arch.FAMILIES["flex_olmo"].router_input == "mlp"
    assert arch.FAMILIES["flex_olmo"].target_settings["norm_topk_prob"] is True


@pytest.mark.parametrize("command", ["upcycle", "split"])
def test_the_format_help_comes_from_the_registry(run_cli, command):
    code, out, _ = run_cli(command, "--help")
    assert code == 0 and "olmo2 -> flex_olmo" in " ".join(out.split())


def test_layer_by_layer_execution_equals_the_whole_model(tmp_path):
    """The streaming runner (used by --verify and calibration) computes transformers' numbers, padding included."""
    from surgery.execution.batches import batches as make_batches
    from surgery.execution.layer_pass import LayerPass
    from surgery.execution.placement import Placement
    from surgery.execution.settings import MemoryBudget
    from surgery.execution.weights import ModelWeights

    batches = list(make_batches(ROWS, 3, 12, 0))
    for family in ("olmo2", "flex_olmo"):
        directory = save_model(tmp_path / family, family, seed=3)
        model = load_model(directory)
        with torch.no_grad():
            expected = [model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits for b in batches]
        with Checkpoint.open(directory) as checkpoint:
            layer_pass = LayerPass(ModelWeights.from_checkpoint(checkpoint), batches, Placement.resolve("cpu"),
                                   MemoryBudget.parse(None))
            hidden = layer_pass.forward()
            out = {}
            layer_pass.head(hidden, lambda index, part, value, extra: out.setdefault(index, []).append(value))
        for batch, index, theirs in zip(batches, sorted(out), expected):
            real = batch.attention_mask.bool()
            assert torch.equal(torch.cat(out[index])[real], theirs[real]), family


# ------------------------------------------------------------------ upcycle
@pytest.mark.parametrize("options", [["--router-init", "normal"], ["--router-init", "calibrated"],
                                     ["--router-init", "normal", "--granularity", "2"]],
                         ids=["normal", "calibrated", "granular"])
def test_upcycle_loads_as_flex_olmo_and_reproduces_olmo2(tmp_path, run_cli, olmo2, token_file, options):
    if "calibrated" in options:
        options = [*options, "--calibration", token_file]
    surgery(run_cli, "upcycle", olmo2, tmp_path / "out", "-n", 4, "-k", 2, *options)
    config = config_of(tmp_path / "out")
    assert config["architectures"] == ["FlexOlmoForCausalLM"] and config["model_type"] == "flex_olmo"
    assert (config["num_experts"], config["num_experts_per_tok"], config["norm_topk_prob"]) == (4, 2, True)
    model = load_model(tmp_path / "out")  # strict: no missing, unexpected or mismatched key
    assert type(model).__name__ == "FlexOlmoForCausalLM"
    assert max_difference(olmo2, tmp_path / "out") <= EXACT


def test_normalised_top_k_is_what_makes_the_upcycle_exact(tmp_path, run_cli, olmo2):
    """FlexOlmo's own default (norm_topk_prob false) weights identical experts by less than 1 in total."""
    surgery(run_cli, "upcycle", olmo2, tmp_path / "out", "-n", 4, "-k", 2)
    assert max_difference(olmo2, tmp_path / "out") <= EXACT
    config = config_of(tmp_path / "out")
    (tmp_path / "out" / "config.json").write_text(json.dumps({**config, "norm_topk_prob": False}))
    assert max_difference(olmo2, tmp_path / "out") > 1e-3


def test_attention_biases_carry_over_since_flex_olmo_has_the_same_attention(tmp_path, run_cli):
    src = save_model(tmp_path / "src", "olmo2", seed=4, attention_bias=True)
    surgery(run_cli, "upcycle", src, tmp_path / "out", "-n", 4, "-k", 2)
    assert config_of(tmp_path / "out")["attention_bias"] is True
    assert "model.layers.1.self_attn.o_proj.bias" in tensors_of(tmp_path / "out")
    assert max_difference(src, tmp_path / "out") <= EXACT


def test_olmo2_rms_norm_eps_is_written_out_where_the_source_config_omits_it(tmp_path, run_cli, olmo2):
    """A config without rms_norm_eps means 1e-5 to OLMo 2 but 1e-6 to FlexOlmo: the result states 1e-5."""
    import shutil

    src = shutil.copytree(olmo2, tmp_path / "src")
    config = {key: value for key, value in config_of(src).items() if key != "rms_norm_eps"}
    (src / "config.json").write_text(json.dumps(config))
    surgery(run_cli, "upcycle", src, tmp_path / "out", "-n", 4, "-k", 2)
    assert config_of(tmp_path / "out")["rms_norm_eps"] == 1e-5
    assert max_difference(src, tmp_path / "out") <= EXACT


def test_verify_passes_layer_by_layer_and_validate_compares_with_the_source(tmp_path, run_cli, olmo2):
    text = surgery(run_cli, "upcycle", olmo2, tmp_path / "out", "-n", 4, "-k", 2, "--verify")
    assert "verify: passed: largest relative difference" in text and "head" in text
    ids = tmp_path / "ids.jsonl"
    ids.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    code, out, err = run_cli("validate", tmp_path / "out", "-r", olmo2, "--tokens", ids, "--device", "cpu",
                             "--expect-exact", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["references"][0]["max_abs_diff"] <= EXACT
    assert [layer["layer"] for layer in report["routing"]] == [0, 1]
    text = surgery(run_cli, "validate", tmp_path / "out", "-r", olmo2)  # the plain report (pseudo-random ids)
    assert "100.00%" in text and "routing per MoE layer" in text  # top-1 agreement with the source


# ------------------------------------------------------------------ calibrated routers read the residual stream
@pytest.fixture(scope="module")
def loud_olmo2(tmp_path_factory):
    """OLMo 2 whose residual stream is not dominated by the normed block outputs (embeddings ~ N(0, 1), as the
    residual stream of a trained model is large): its mlp input is far from post_attention_layernorm's output."""
    from tiny_models import build_model

    model = build_model("olmo2", seed=2)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(50)
    directory = tmp_path_factory.mktemp("loud") / "src"
    model.save_pretrained(directory)
    return directory


def test_calibrated_router_rows_are_kmeans_of_the_post_attention_residual_stream(tmp_path, run_cli, loud_olmo2,
                                                                                   token_file):
    """The rows --router-init calibrated fits are k-means of each layer's mlp input (the residual stream), not of
    post_attention_layernorm's output (where a pre-norm family's router reads)."""
    surgery(run_cli, "upcycle", loud_olmo2, tmp_path / "out", "-n", 4, "-k", 2, "--router-init", "calibrated",
            "--calibration", token_file, "--seed", 5)
    calibration = CalibrationSet.load(token_file, loud_olmo2, config_of(loud_olmo2), 2048)
    model = load_model(loud_olmo2)
    residual = router_inputs_by_hooks(model, calibration.batches, [0, 1])  # what each layer's mlp reads
    normed = norm_outputs_by_hooks(model, calibration.batches, [0, 1])
    written = tensors_of(tmp_path / "out")
    for layer in (0, 1):
        def fit(inputs):
            return make("kmeans", RouterRequest(4, 32, seed=sklearn_state(5, "kmeans", layer), std=0.02,
                                                inputs=inputs)).rows
        rows = written[f"model.layers.{layer}.mlp.gate.weight"]
        assert torch.allclose(rows, fit(residual[layer]), atol=1e-5)
        unit = torch.nn.functional.normalize
        best = (unit(rows, dim=1) @ unit(fit(normed[layer]), dim=1).T).max(dim=1).values
        assert float(best.mean()) < 0.9  # fitted on the norm output, the rows would point elsewhere
        # the mlp input is the residual stream: the layer's input plus the normed attention output
        assert torch.allclose(residual[layer], normed["input", layer] + normed[layer], atol=1e-6)
    assert max_difference(loud_olmo2, tmp_path / "out") <= EXACT


def norm_outputs_by_hooks(model, batches, layers) -> dict:
    """{layer: post_attention_layernorm output, ("input", layer): decoder layer input} on real tokens."""
    captured, handles = {}, []
    for layer in layers:
        module = model.model.layers[layer]
        handles.append(module.post_attention_layernorm.register_forward_hook(
            lambda _m, _args, output, layer=layer: captured.setdefault(layer, []).append(output.detach())))
        handles.append(module.register_forward_pre_hook(
            lambda _m, args, layer=layer: captured.setdefault(("input", layer), []).append(args[0].detach())))
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for key, values in captured.items():
        rows = [value.reshape(-1, value.shape[-1])[batch.attention_mask.reshape(-1).bool()].float()
                for value, batch in zip(values, batches)]
        out[key] = torch.cat(rows)
    return out


# ------------------------------------------------------------------ split and merge
def test_split_at_k_equals_n_with_a_zero_router_reproduces_olmo2(tmp_path, run_cli, olmo2):
    surgery(run_cli, "split", olmo2, tmp_path / "out", "-n", 4, "-k", 4, "--strategy", "random", "--router-init", "zero")
    assert config_of(tmp_path / "out")["model_type"] == "flex_olmo"
    assert config_of(tmp_path / "out")["intermediate_size"] == 11  # 44 neurons in 4 experts
    assert max_difference(olmo2, tmp_path / "out") <= EXACT


def test_merging_copies_of_one_olmo2_model_reproduces_it(tmp_path, run_cli, olmo2):
    surgery(run_cli, "merge", tmp_path / "out", "--expert", f"x={olmo2}", "--expert", f"y={olmo2}",
            "--router-init", "normal")
    assert config_of(tmp_path / "out")["architectures"] == ["FlexOlmoForCausalLM"]
    assert max_difference(olmo2, tmp_path / "out") <= EXACT


# ------------------------------------------------------------------ what the pair refuses
@pytest.mark.parametrize("command,args,message", [
    ("upcycle", ["--format", "mixtral"], "a olmo2 model cannot become mixtral (formats for olmo2: flex_olmo)"),
    ("upcycle", ["--shared-expert"], "format flex_olmo has no shared expert"),
    ("upcycle", ["--moe-layers", "every-other"], "format flex_olmo makes every layer MoE"),
])
def test_what_flex_olmo_cannot_hold_is_refused_before_writing(tmp_path, run_cli, olmo2, command, args, message):
    code, _, err = run_cli(command, olmo2, tmp_path / "out", "-n", 4, "-k", 2, *args)
    assert code == 2 and message in " ".join(err.split()) and not (tmp_path / "out").exists()


def test_a_llama_model_cannot_become_flex_olmo(tmp_path, run_cli):
    """FlexOlmo is post-norm with q/k norms: a pre-norm Llama could not be reproduced."""
    src = save_model(tmp_path / "llama", "llama")
    code, _, err = run_cli("upcycle", src, tmp_path / "out", "-n", 4, "-k", 2, "--format", "flex_olmo")
    assert code == 2 and "a llama model cannot become flex_olmo" in err
