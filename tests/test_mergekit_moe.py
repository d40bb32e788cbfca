"""What each mergekit-moe key becomes (surgery/mergekit_moe.py): the shared expert against a hand computation,
noise_scale, residual_scale, negative prompts, a directory given twice, architecture spellings, references
that are not local directories, and notes that stay true when the command line overrides the config."""

import json

import pytest
import torch
import yaml
from test_merge import TEXTS, digest, save_member, tensors_of
from tiny_models import load_model

from surgery.errors import SurgeryError
from surgery.io.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A seed and three domain copies (llama, character tokenizer), as tests/test_merge.py builds them."""
    root = tmp_path_factory.mktemp("world")
    return {name: save_member(root / name, seed=number) for number, name in enumerate(["seed", "a", "b", "c"])}


def write_config(directory, name="mk.yml", **config):
    path = directory / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def experts_of(world, names, **extra):
    return [{"source_model": str(world[name]), **extra} for name in names]


def notes_of(err: str) -> str:
    return " ".join(err.split())  # the console wraps long lines


def metadata(directory) -> dict:
    return next(iter(Checkpoint.open(directory).metadata.values()))


# ------------------------------------------------------------------ the shared expert
def shared_contribution(model, layer: int, x):
    """What the shared expert adds in the MoE block: the block's output minus its output with the shared
    expert's down_proj zeroed (the routed experts' part is the same in both)."""
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        full = mlp(x)
        down = mlp.shared_expert.down_proj.weight
        saved = down.clone()
        down.zero_()
        routed = mlp(x)
        down.copy_(saved)
    return full - routed


def dense_ffn(source, layer: int, x):
    """The source model's FFN, computed by hand from its stored weights."""
    weights = tensors_of(source)
    gate, up, down = (weights[f"model.layers.{layer}.mlp.{n}_proj.weight"].float() for n in ("gate", "up", "down"))
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def test_shared_expert_without_prompts_adds_exactly_residual_scale_times_its_ffn_on_every_token(tmp_path, world,
                                                                                                 run_cli):
    config = write_config(tmp_path, base_model=str(world["seed"]), gate_mode="random", architecture="qwen",
                          experts=experts_of(world, "ab"),
                          shared_experts=[{"source_model": str(world["c"]), "residual_scale": 0.1}])
    code, _, err = run_cli("merge", tmp_path / "out", "--config", config)
    assert code == 0, err
    assert "the gate is sigmoid(0) = 1/2 for every token" in notes_of(err)
    model = load_model(tmp_path / "out")
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    x = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0))
    for layer in range(2):
        assert torch.count_nonzero(model.model.layers[layer].mlp.shared_expert_gate.weight) == 0
        torch.testing.assert_close(shared_contribution(model, layer, x), 0.1 * dense_ffn(world["c"], layer, x),
                                   rtol=1e-5, atol=1e-6)


def test_shared_expert_with_prompts_is_gated_by_a_sigmoid_fitted_to_open_on_its_text(tmp_path, world, run_cli):
    config = write_config(tmp_path, base_model=str(world["seed"]), gate_mode="hidden", architecture="qwen",
                          experts=[{"source_model": str(world[n]), "positive_prompts": [TEXTS[n][:300]]} for n in "ab"],
                          shared_experts=[{"source_model": str(world["seed"]), "positive_prompts": [TEXTS["c"][:300]],
                                           "residual_scale": 0.5}])
    code, _, err = run_cli("merge", tmp_path / "out", "--config", config)
    assert code == 0, err
    assert "its sigmoid gate is fitted layer by layer (logistic)" in notes_of(err)
    mine, others = (float(v) for v in err.split("layer 0 ")[1].split(",")[0].split(" / "))
    assert mine > 0.9 and others < 0.1  # the gate opens on its own text, closes on the routed experts'
    model = load_model(tmp_path / "out")
    x = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0))
    for layer in range(2):
        gate = model.model.layers[layer].mlp.shared_expert_gate.weight.detach()
        expected = torch.sigmoid(x @ gate.T) * 0.5 * dense_ffn(world["seed"], layer, x)
        torch.testing.assert_close(shared_contribution(model, layer, x), expected, rtol=1e-5, atol=1e-6)


def test_shared_expert_prompts_with_embedding_routers_are_refused_naming_the_key(tmp_path, world, run_cli):
    config = write_config(tmp_path, base_model=str(world["seed"]), gate_mode="cheap_embed",
                          experts=[{"source_model": str(world[n]), "positive_prompts": [TEXTS[n][:100]]} for n in "ab"],
                          shared_experts=[{"source_model": str(world["c"]), "positive_prompts": ["hi"]}])
    code, _, err = run_cli("merge", tmp_path / "out", "--config", config)
    assert code == 2 and "shared_experts[0].positive_prompts: the shared expert's gate is fitted on text only" in err


def test_shared_experts_from_a_model_without_a_shared_expert_format_are_refused(tmp_path, run_cli):
    models = {name: save_member(tmp_path / name, "qwen3", seed=seed) for seed, name in enumerate("xyz")}
    config = write_config(tmp_path, base_model=str(models["x"]), gate_mode="random",
                          experts=experts_of(models, "xy"), shared_experts=experts_of(models, "z"))
    code, _, err = run_cli("merge", tmp_path / "out", "--config", config)
    assert code == 2 and "shared_experts needs a format with a shared expert, but a qwen3 model can become only " \
                         "qwen3_moe" in err


# ------------------------------------------------------------------ noise_scale and residual_scale
def test_noise_scale_is_drawn_from_the_router_seed_so_the_same_config_gives_the_same_bytes(tmp_path, world, run_cli):
    config = write_config(tmp_path, base_model=str(world["seed"]), gate_mode="random",
                          experts=experts_of(world, "ab", noise_scale=0.01))
    for out, extra in (("one", []), ("two", []), ("other", ["--router-seed", "1"])):
        assert run_cli("merge", tmp_path / out, "--config", config, *extra)[0] == 0
    name = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    one, two, other = (tensors_of(tmp_path / out)[name] for out in ("one", "two", "other"))
    assert digest(tmp_path / "one") == digest(tmp_path / "two") and not torch.equal(one, other)
    noise = one - tensors_of(world["a"])["model.layers.0.mlp.gate_proj.weight"]
    assert 0.008 < float(noise.std()) < 0.012


def test_residual_scale_multiplies_that_experts_down_proj_only(tmp_path, world, run_cli):
    config = write_config(tmp_path, base_model=str(world["seed"]), gate_mode="random",
                          experts=[{"source_model": str(world["a"]), "residual_scale": 0.3},
                                   {"source_model": str(world["b"])}])
    code, _, err = run_cli("merge", tmp_path / "out", "--config", config)
    assert code == 0 and "experts[0].residual_scale 0.3: the down_proj is multiplied by 0.3" in notes_of(err)
    out, a = tensors_of(tmp_path / "out"), tensors_of(world["a"])
    for role, dense in (("w1", "gate_proj"), ("w3", "up_proj")):
        assert torch.equal(out[f"model.layers.1.block_sparse_moe.experts.0.{role}.weight"],
                           a[f"model.layers.1.mlp.{dense}.weight"])
    assert torch.equal(out["model.layers.1.block_sparse_moe.experts.0.w2.weight"],
                       a["model.layers.1.mlp.down_proj.weight"] * 0.3)
    assert torch.equal(out["model.layers.1.block_sparse_moe.experts.1.w2.weight"],
                       tensors_of(world["b"])["model.layers.1.mlp.down_proj.weight"])


# ------------------------------------------------------------------ negative prompts
def test_negative_tokens_pull_their_experts_routing_weight_down():
    from surgery.execution.routers.measure import routing_weights
    from surgery.execution.routers.registry import make
    from surgery.execution.routers.request import RouterRequest

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 16, generator=generator)
    inputs = torch.cat([centres[e] + 0.8 * torch.randn(200, 16, generator=generator) for e in range(2)])
    labels = torch.cat([torch.zeros(200), torch.ones(200)]).long()
    avoid = centres[0] + 0.8 * torch.randn(100, 16, generator=generator)  # expert 0's region, marked "not expert 0"
    plain = make("logistic", RouterRequest(2, 16, inputs=inputs, targets=labels)).rows
    pushed = make("logistic", RouterRequest(2, 16, inputs=inputs, targets=labels,
                                            negatives=(avoid, torch.zeros(100).long()))).rows
    assert routing_weights(avoid, pushed, 1)[:, 0].mean() < routing_weights(avoid, plain, 1)[:, 0].mean() - 0.1


def test_embedding_rows_subtract_the_mean_embedding_of_the_negative_prompts(world):
    from surgery.execution.batches import tokenize
    from surgery.execution.loading import load_tokenizer
    from surgery.execution.routers.classifier import centred_unit_rows
    from surgery.execution.routers.registry import make
    from surgery.execution.routers.request import RouterRequest

    tokenizer = load_tokenizer(world["a"])
    embedding = tensors_of(world["a"])["model.embed_tokens.weight"]

    def mean(text):
        return embedding[torch.tensor(tokenize(tokenizer, text))].mean(0)

    def vectors(texts):  # the embedding rows of each text's tokens, labelled with its expert
        ids = [(expert, tokenize(tokenizer, text)) for expert, text in texts]
        return (torch.cat([embedding[torch.tensor(tokens)] for _, tokens in ids]),
                torch.cat([torch.full((len(tokens),), expert) for expert, tokens in ids]))

    inputs, labels = vectors([(0, "def f(x):"), (1, "Once upon a time")])
    rows = make("embedding", RouterRequest(2, 32, inputs=inputs, targets=labels,
                                           negatives=vectors([(0, "hello there")]))).rows
    expected = centred_unit_rows({0: mean("def f(x):") - mean("hello there"), 1: mean("Once upon a time")}, 2, 32)
    torch.testing.assert_close(rows, expected)


def test_negative_prompts_are_fitted_against_and_recorded(tmp_path, world, run_cli):
    config = write_config(tmp_path, base_model=str(world["seed"]), gate_mode="hidden",
                          experts=[{"source_model": str(world["a"]), "positive_prompts": [TEXTS["a"][:300]],
                                    "negative_prompts": [TEXTS["c"][:300]]},
                                   {"source_model": str(world["b"]), "positive_prompts": [TEXTS["b"][:300]]}])
    code, _, err = run_cli("merge", tmp_path / "out", "--config", config)
    assert code == 0 and "so that each expert's positive_prompts go to it and its negative_prompts do not" in \
        notes_of(err)
    options = json.loads(metadata(tmp_path / "out")["surgery_options"])
    assert options["negative_calibration"] == {"a": "mergekit negative_prompts of experts[0] (1)"}


# ------------------------------------------------------------------ a directory given twice
def test_base_model_listed_again_as_an_expert_enters_the_average_once(tmp_path, world, run_cli):
    config = write_config(tmp_path, base_model=str(world["seed"]), gate_mode="random",
                          experts=experts_of(world, ["seed", "a", "b"]))
    code, _, err = run_cli("merge", tmp_path / "out", "--config", config)
    assert code == 0, err
    assert f"{world['seed']} is given as seed, seed-2: it enters the non-FFN average once, as seed" in notes_of(err)
    described = json.loads(metadata(tmp_path / "out")["surgery_non_ffn"])
    assert described["weights"] == {"a": pytest.approx(1 / 3), "b": pytest.approx(1 / 3), "seed": pytest.approx(1 / 3)}
    experts = json.loads(metadata(tmp_path / "out")["surgery_experts"])
    assert [(e["name"], e["weight"]) for e in experts] == [("seed-2", 0.0), ("a", 1.0), ("b", 1.0)]


def test_verify_validates_against_each_directory_once(tmp_path, world, run_cli, monkeypatch):
    from surgery.checks import report_view, validation

    calls = []
    monkeypatch.setattr(validation, "validate",
                        lambda out, references, **options: calls.append(references) or {"loss": None})
    monkeypatch.setattr(report_view, "print_result", lambda result: None)
    config = write_config(tmp_path, base_model=str(world["seed"]), gate_mode="random",
                          experts=experts_of(world, ["seed", "a"]))
    assert run_cli("merge", tmp_path / "out", "--config", config, "--verify")[0] == 0
    assert calls == [[str(world["seed"]), str(world["a"])]]


def test_a_weight_for_the_second_name_of_a_directory_is_refused(tmp_path, world, run_cli):
    code, _, err = run_cli("merge", tmp_path / "out", "--expert", f"x={world['a']}", "--expert", f"y={world['a']}",
                           "--expert", f"b={world['b']}", "--weights", "y=2")
    assert code == 2 and f"--weights names y, the same directory as x ({world['a']})" in err


# ------------------------------------------------------------------ notes after command-line overrides
def test_non_ffn_seed_on_the_command_line_makes_the_note_say_copied(tmp_path, world, run_cli):
    config = write_config(tmp_path, base_model=str(world["seed"]), gate_mode="random", experts=experts_of(world, "ab"))
    code, _, err = run_cli("merge", tmp_path / "out", "--config", config, "--non-ffn", "seed")
    notes = notes_of(err)
    assert code == 0 and "are copied from base_model, as mergekit does" in notes and "AVERAGED" not in notes


def test_router_init_on_the_command_line_makes_the_gate_mode_note_say_overridden(tmp_path, world, run_cli):
    config = write_config(tmp_path, base_model=str(world["seed"]), gate_mode="random", experts=experts_of(world, "ab"))
    code, _, err = run_cli("merge", tmp_path / "out", "--config", config, "--router-init", "zero")
    notes = notes_of(err)
    assert code == 0 and "gate_mode random is overridden: router_init zero" in notes and "N(0, 0.02)" not in notes


def test_prompts_with_random_gates_are_noted_as_unread_and_left_out_of_the_model_card(tmp_path, world, run_cli):
    config = write_config(tmp_path, base_model=str(world["seed"]), gate_mode="random",
                          experts=experts_of(world, "ab", positive_prompts=["hello"]))
    code, _, err = run_cli("merge", tmp_path / "out", "--config", config)
    assert code == 0 and "router_init normal reads no text: the positive/negative prompts are not used" in notes_of(err)
    assert "Calibration text" not in (tmp_path / "out" / "README.md").read_text()


def test_out_dtype_is_the_output_dtype_and_the_note_says_mergekit_moe_ignores_it(tmp_path, world, run_cli):
    config = write_config(tmp_path, base_model=str(world["seed"]), gate_mode="random", dtype="bfloat16",
                          out_dtype="float16", experts=experts_of(world, "ab"))
    code, _, err = run_cli("merge", tmp_path / "out", "--config", config)
    assert code == 0 and "mergekit-moe does not read out_dtype and would write bfloat16" in notes_of(err)
    assert {t.dtype for t in tensors_of(tmp_path / "out").values()} == {torch.float16}


# ------------------------------------------------------------------ architecture spellings and references
@pytest.mark.parametrize("spelling,formats", [
    ("mixtral", ("mixtral",)), ("Mixtral", ("mixtral",)), ("mix", ("mixtral",)), ("qwen", ("qwen2_moe", "qwen3_moe")),
    ("Qwen MoE", ("qwen2_moe",)), ("qwen3", ("qwen3_moe",)), ("qwen3 moe", ("qwen3_moe",)),
    ("qwen2_moe", ("qwen2_moe",)), ("flex_olmo", ("flex_olmo",)),
])
def test_architecture_names_the_formats_whose_mergekit_name_it_begins(tmp_path, spelling, formats):
    from surgery.btx.mergekit import _formats

    assert _formats(spelling, tmp_path / "mk.yml") == formats


@pytest.mark.parametrize("spelling,message", [
    ("deepseek", "architecture 'deepseek' (deepseek moe) is not supported: mergekit's DeepSeek MoE output loads "
                 "only with trust_remote_code"),
    ("llama", "architecture 'llama' is not one mergekit-moe writes that surgery does (expected one of: mixtral, "
              "qwen moe, qwen3 moe, or a format:"),
])
def test_other_architectures_are_refused_with_the_reason(tmp_path, spelling, message):
    from surgery.btx.mergekit import _formats

    with pytest.raises(SurgeryError) as refused:
        _formats(spelling, tmp_path / "mk.yml")
    assert message in str(refused.value)


@pytest.mark.parametrize("reference,message", [
    ("mlabonne/AlphaMonarch-7B", "(huggingface-cli download mlabonne/AlphaMonarch-7B --local-dir DIR) and give DIR"),
    ("mlabonne/AlphaMonarch-7B@main", "names revision 'main' of 'mlabonne/AlphaMonarch-7B': models must be local "
                                      "directories"),
    ("./base+./lora", "applies a LoRA adapter (MODEL+LORA)"),
    ({"model": "./base", "lora": "./lora"}, "lora is not supported: merge the adapter into its model first"),
])
def test_references_that_are_not_local_directories_are_refused_with_what_to_do(tmp_path, reference, message):
    from surgery.btx.mergekit import model_path

    with pytest.raises(SurgeryError) as refused:
        model_path(reference, tmp_path / "mk.yml", "base_model")
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_python_api_merges_a_mergekit_config_with_a_shared_expert(tmp_path, world):
    import surgery

    config = write_config(tmp_path, base_model=str(world["seed"]), gate_mode="random", architecture="qwen",
                          experts=experts_of(world, "ab"), shared_experts=experts_of(world, "c"))
    surgery.merge(tmp_path / "out", config=config)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["shared_expert_intermediate_size"] == 44
