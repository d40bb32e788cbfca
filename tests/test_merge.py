"""`surgery merge` (Branch-Train-MiX): averaged non-FFN weights, FFNs as experts, routers, checks.

"Domain copies" are tiny transformers-built models with different seeds; they share a
character-level tokenizer so that router inits that read text can run.
"""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from tiny_models import load_model, logits, router_inputs_by_hooks, sample_ids, save_model

from surgery import families as arch
from surgery.io.checkpoint import Checkpoint

TEXTS = {
    "a": "def add(x, y):\n    return x + y\n\nclass Box:\n    pass\n" * 30,
    "b": "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 30,
    "c": "12 + 34 = 46\n7 * 8 = 56\n90 - 45 = 45\n" * 30,
}


def save_char_tokenizer(directory, vocab_size=96):
    """A character-level tokenizer whose ids fit the tiny models' vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for code in range(32, 32 + vocab_size - 5):
        vocab[chr(code)] = len(vocab)
    vocab["\n"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(str(directory))


def save_member(directory, family="llama", seed=0, tokenizer=True, **overrides):
    save_model(directory, family, seed=seed, **overrides)
    if tokenizer:
        save_char_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """seed + three 'domain copies' (llama) with calibration text files."""
    root = tmp_path_factory.mktemp("world")
    paths = {name: save_member(root / name, seed=number) for number, name in enumerate(["seed", "a", "b", "c"])}
    for name, text in TEXTS.items():
        (root / f"{name}.txt").write_text(text)
        paths[f"{name}.txt"] = root / f"{name}.txt"
    return paths


def expert_args(world, names=("a", "b", "c")):
    return [arg for name in names for arg in ("--expert", f"{name}={world[name]}")]


def calibration_args(world, names=("a", "b", "c")):
    return [arg for name in names for arg in ("--calibration", f"{name}={world[name + '.txt']}")]


def tensors_of(directory):
    checkpoint = Checkpoint.open(directory)
    return {name: checkpoint.read(name) for name in checkpoint.tensors}


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def moe_names(directory):
    config = json.loads((directory / "config.json").read_text())
    return arch.detect_family(config), config


# ------------------------------------------------------------------ what is written
def test_non_ffn_tensors_are_the_weighted_mean_of_all_models(tmp_path, world, run_cli):
    weights = {"a": 1.0, "b": 2.0, "c": 3.0, "seed": 0.5}
    code, _, err = run_cli("merge", tmp_path / "out", "--seed", world["seed"], *expert_args(world),
                           "--weights", ",".join(f"{k}={v}" for k, v in weights.items()), "--router-init", "zero")
    assert code == 0, err
    out = tensors_of(tmp_path / "out")
    inputs = {name: tensors_of(world[name]) for name in weights}
    family = arch.FAMILIES["llama"]
    ffn = {family.spec("ffn", role).name(layer) for layer in range(2) for role in ("gate", "up", "down")}
    non_ffn = [name for name in inputs["a"] if name not in ffn]
    assert non_ffn and all(name in out for name in non_ffn)
    for name in non_ffn:  # float32 mean; tolerance: float32 rounding of 4 terms
        expected = sum(w * inputs[m][name].double() for m, w in weights.items()) / sum(weights.values())
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-6, atol=1e-7)


def test_a_float32_merge_with_a_normal_router_never_imports_torch(tmp_path, world):
    """Averaging, expert copies and router init all run in numpy: no 2 s torch import."""
    args = ["merge", str(tmp_path / "out"), "--seed", str(world["seed"]), *map(str, expert_args(world)),
            "--router-init", "normal"]
    code = ("import sys; from surgery.cli import main\n"
            f"try: main({args!r})\nexcept SystemExit as e: assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_expert_i_of_layer_l_is_model_i_ffn_bit_exactly(tmp_path, world, run_cli):
    code, _, err = run_cli("merge", tmp_path / "out", "--seed", world["seed"], *expert_args(world), "--include-seed",
                           "--router-init", "normal")
    assert code == 0, err
    out = tensors_of(tmp_path / "out")
    target, config = moe_names(tmp_path / "out")
    assert target.name == "mixtral" and config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 2
    dense = arch.FAMILIES["llama"]
    for expert, name in enumerate(["a", "b", "c", "seed"]):
        source = tensors_of(world[name])
        for layer in range(2):
            for role in ("gate", "up", "down"):
                merged = out[target.spec("experts", role).name(layer, expert)]
                assert torch.equal(merged, source[dense.spec("ffn", role).name(layer)])
    assert torch.equal(out["model.layers.1.block_sparse_moe.experts.2.w2.weight"],
                       tensors_of(world["c"])["model.layers.1.mlp.down_proj.weight"])


def test_non_ffn_seed_copies_the_seed_bit_exactly(tmp_path, world, run_cli):
    code, _, err = run_cli("merge", tmp_path / "out", "--seed", world["seed"], *expert_args(world),
                           "--non-ffn", "seed", "--router-init", "zero")
    assert code == 0, err
    out, seed = tensors_of(tmp_path / "out"), tensors_of(world["seed"])
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], seed["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], seed["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], seed["lm_head.weight"])


@pytest.mark.parametrize("family,fmt", [("llama", "mixtral"), ("mistral", "mixtral"), ("llama", "qwen2_moe"),
                                        ("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe")])
def test_merging_copies_of_one_model_loads_strictly_and_reproduces_it(tmp_path, run_cli, family, fmt):
    source = save_member(tmp_path / "src", family, tokenizer=False)
    code, _, err = run_cli("merge", tmp_path / "out", "--expert", f"x={source}", "--expert", f"y={source}",
                           "--format", fmt, "--router-init", "normal")
    assert code == 0, err
    merged = load_model(tmp_path / "out")  # fails on any missing, unexpected or mismatched key
    assert type(merged).__name__ == arch.FAMILIES[fmt].architecture
    ids = sample_ids()  # identical experts with renormalised top-k: the dense model exactly (float32 rounding)
    torch.testing.assert_close(logits(merged, ids), logits(load_model(source), ids), rtol=1e-5, atol=1e-5)


def test_qwen2_moe_output_carries_an_inert_all_zero_shared_expert(tmp_path, world, run_cli):
    code, _, err = run_cli("merge", tmp_path / "out", *expert_args(world), "--format", "qwen2_moe",
                           "--router-init", "zero")
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == 8 and config["num_experts"] == 3
    shared = {n: t for n, t in tensors_of(tmp_path / "out").items() if "shared_expert" in n}
    assert len(shared) == 8 and all(torch.count_nonzero(t) == 0 for t in shared.values())
    load_model(tmp_path / "out")


def test_provenance_metadata_and_model_card_name_every_expert(tmp_path, world, run_cli):
    code, _, err = run_cli("merge", tmp_path / "out", "--seed", world["seed"], *expert_args(world), "--include-seed",
                           "--weights", "a=2", "--router-init", "zero")
    assert code == 0, err
    metadata = Checkpoint.open(tmp_path / "out").metadata
    experts = json.loads(next(iter(metadata.values()))["surgery_experts"])
    assert [(e["name"], e["source"], e["weight"]) for e in experts] == [
        ("a", str(world["a"]), 2.0), ("b", str(world["b"]), 1.0), ("c", str(world["c"]), 1.0),
        ("seed", str(world["seed"]), 1.0)]
    card = (tmp_path / "out" / "README.md").read_text()
    assert all(f"`{world[name]}`" in card for name in ("a", "b", "c", "seed")) and "top-2" in card
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (world["seed"] / "tokenizer.json").read_bytes()


# ------------------------------------------------------------------ routers
def own_expert_share(directory, world, layer_count=2):
    """Per layer, the share of each domain's tokens whose top-1 expert is the domain's own expert."""
    from surgery.execution.batches import text_batches
    from surgery.execution.loading import load_model as strict_load
    from surgery.execution.loading import load_tokenizer

    model, tokenizer = strict_load(directory), load_tokenizer(directory)
    shares = []
    for layer in range(layer_count):
        router = model.model.layers[layer].mlp.gate.weight.detach()
        hits = [float((router_inputs_by_hooks(model, text_batches(tokenizer, TEXTS[name], 8, 256, 512), [layer])[layer]
                       @ router.T).argmax(-1).eq(expert).float().mean()) for expert, name in enumerate("abc")]
        shares.append(hits)
    return shares


def test_calibrated_router_sends_each_domain_to_its_own_expert(tmp_path, world, run_cli):
    # the averaged non-FFN weights: the router alone is under test (this world's "domain" models are unrelated
    # random models, whose RegMean++ attention separates the domains less at layer 1: 84-98 %)
    code, _, err = run_cli("merge", tmp_path / "out", "--seed", world["seed"], *expert_args(world),
                           *calibration_args(world), "--router-init", "calibrated", "--router-fit", "logistic",
                           "--non-ffn", "average")
    assert code == 0, err
    assert "routing" in err and "domain" in err  # the domain x expert table is shown
    assert all(share > 0.9 for layer in own_expert_share(tmp_path / "out", world) for share in layer)
    assert "## Routing on the calibration text" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("fit", ["logistic", "class-mean"])
def test_calibrated_routers_equal_fitting_the_written_merge_loaded_whole(tmp_path, world, run_cli, fit):
    """The layer-by-layer fit gives the routers of the former whole-model procedure: write the merge with
    zero routers, load it with transformers, and fit each layer's router in order on its hooked inputs."""
    from surgery.execution.calibration import CalibrationSet
    from surgery.execution.loading import load_tokenizer
    from surgery.execution.routers.registry import make
    from surgery.execution.routers.request import RouterRequest

    common = ["--seed", world["seed"], *expert_args(world), "--calibration-tokens", 300, "--non-ffn", "average"]
    assert run_cli("merge", tmp_path / "fitted", *common, *calibration_args(world), "--router-init", "calibrated",
                   "--router-fit", fit, "--device", "cpu")[0] == 0
    assert run_cli("merge", tmp_path / "zero", *common, "--router-init", "zero")[0] == 0
    model, tokenizer = load_model(tmp_path / "zero"), load_tokenizer(tmp_path / "zero")
    domains = {expert: CalibrationSet.from_text(TEXTS[name], tokenizer, model.config.to_dict(), 300, name).batches
               for expert, name in enumerate("abc")}
    fitted = tensors_of(tmp_path / "fitted")
    for layer in range(2):
        inputs = {expert: router_inputs_by_hooks(model, batches, [layer])[layer] for expert, batches in domains.items()}
        labels = torch.cat([torch.full((len(inputs[e]),), e) for e in sorted(inputs)])
        rows = make(fit, RouterRequest(3, 32, inputs=torch.cat([inputs[e] for e in sorted(inputs)]),
                                       targets=labels)).rows
        with torch.no_grad():
            model.model.layers[layer].mlp.gate.weight.copy_(rows)
        assert torch.allclose(fitted[f"model.layers.{layer}.block_sparse_moe.gate.weight"], rows, atol=1e-5)


@pytest.mark.parametrize("fit", ["logistic", "class-mean"])
def test_fitted_router_rows_separate_domain_clusters(fit):
    from surgery.execution.routers.measure import routing_shares
    from surgery.execution.routers.registry import make
    from surgery.execution.routers.request import RouterRequest

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator)
    inputs = {expert: centres[expert] + 0.5 * torch.randn(200, 16, generator=generator) for expert in range(3)}
    labels = torch.cat([torch.full((200,), expert) for expert in range(3)])
    rows = make(fit, RouterRequest(4, 16, inputs=torch.cat(list(inputs.values())), targets=labels)).rows  # expert 3: no domain, zero row
    assert torch.count_nonzero(rows[3]) == 0
    shares = routing_shares(inputs, rows, top_k=1)
    assert all(shares[expert, expert] > 0.95 for expert in range(3))


def test_zero_router_sends_no_domain_to_its_own_expert_preferentially(tmp_path, world, run_cli):
    code, _, err = run_cli("merge", tmp_path / "out", *expert_args(world), "--router-init", "zero")
    assert code == 0, err
    assert all(torch.count_nonzero(t) == 0 for n, t in tensors_of(tmp_path / "out").items() if "gate.weight" in n)


def test_auto_router_init_without_text_is_normal_so_no_logits_tie(tmp_path, world, run_cli):
    code, _, err = run_cli("merge", tmp_path / "out", *expert_args(world))
    assert code == 0, err
    checkpoint = Checkpoint.open(tmp_path / "out")
    options = json.loads(next(iter(checkpoint.metadata.values()))["surgery_options"])
    routers = [checkpoint.read(f"model.layers.{layer}.block_sparse_moe.gate.weight") for layer in range(2)]
    assert options["router_init"] == "normal" and not torch.equal(routers[0], routers[1])
    assert all(len(set(row.tolist())) == row.numel() for router in routers for row in router.T[:4])  # no ties


def test_auto_router_init_is_calibrated_when_every_expert_has_text(tmp_path, world, run_cli):
    code, _, err = run_cli("merge", tmp_path / "out", *expert_args(world), *calibration_args(world))
    assert code == 0, err
    options = json.loads(next(iter(Checkpoint.open(tmp_path / "out").metadata.values()))["surgery_options"])
    assert options["router_init"] == "calibrated"


def test_embedding_router_rows_are_unit_directions_and_the_seed_expert_row_is_zero(tmp_path, world, run_cli):
    code, _, err = run_cli("merge", tmp_path / "out", "--seed", world["seed"], *expert_args(world), "--include-seed",
                           *calibration_args(world), "--router-init", "embedding")
    assert code == 0, err
    router = tensors_of(tmp_path / "out")["model.layers.1.block_sparse_moe.gate.weight"]
    torch.testing.assert_close(router[:3].norm(dim=1), torch.ones(3))
    assert torch.count_nonzero(router[3]) == 0


def test_router_inits_that_read_text_need_calibration_for_every_expert(tmp_path, world, run_cli):
    code, _, err = run_cli("merge", tmp_path / "out", *expert_args(world), *calibration_args(world, ("a", "b")),
                           "--router-init", "calibrated")
    assert code == 2 and "missing for c" in err and "--calibration c=FILE" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ determinism
@pytest.mark.parametrize("init", ["normal", "calibrated"])
def test_same_inputs_give_byte_identical_output_and_inputs_are_untouched(tmp_path, world, run_cli, init):
    before = {name: digest(world[name]) for name in ("seed", "a", "b", "c")}
    for out in ("one", "two"):
        code, _, err = run_cli("merge", tmp_path / out, "--seed", world["seed"], *expert_args(world),
                               *calibration_args(world), "--router-init", init, "--max-shard-size", "60KB")
        assert code == 0, err
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    assert len(list((tmp_path / "one").glob("model-*.safetensors"))) > 1
    assert {name: digest(world[name]) for name in ("seed", "a", "b", "c")} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind


def test_dry_run_writes_nothing_and_describes_the_calibrated_router(tmp_path, world, run_cli):
    code, out, err = run_cli("merge", tmp_path / "out", *expert_args(world), *calibration_args(world), "--dry-run",
                             "--json")
    assert code == 0, err
    plan = json.loads(out)
    recipes = {t["name"]: t["recipe"] for t in plan["tensors"]}
    assert recipes["model.layers.0.block_sparse_moe.gate.weight"].startswith("calibrated on a, b, c")
    assert recipes["model.layers.0.block_sparse_moe.experts.1.w1.weight"] == "copy b:model.layers.0.mlp.gate_proj.weight"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("overrides,key", [
    ({"intermediate_size": 40}, "intermediate_size"),
    ({"vocab_size": 100}, "vocab_size"),
    ({"rope_theta": 500000.0}, "rope"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 16}, "head_dim"),
])
def test_incompatible_models_are_refused_with_the_key_named(tmp_path, world, run_cli, overrides, key):
    odd = save_member(tmp_path / "odd", seed=7, tokenizer=False, **overrides)
    code, _, err = run_cli("merge", tmp_path / "out", *expert_args(world, ("a", "b")), "--expert", f"odd={odd}",
                           "--router-init", "zero")
    assert code == 2 and f"surgery: error: {odd / 'config.json'}: {key}" in err
    assert not (tmp_path / "out").exists()


def test_another_architecture_is_refused(tmp_path, world, run_cli):
    odd = save_member(tmp_path / "odd", "qwen2", tokenizer=False)
    code, _, err = run_cli("merge", tmp_path / "out", *expert_args(world, ("a",)), "--expert", f"odd={odd}")
    assert code == 2 and "architecture is Qwen2ForCausalLM in odd, but LlamaForCausalLM in a" in err


def test_a_different_tokenizer_is_refused_by_content(tmp_path, world, run_cli):
    odd = save_member(tmp_path / "odd", seed=5)
    (odd / "tokenizer.json").write_text((odd / "tokenizer.json").read_text().replace('"x"', '"X"', 1))
    code, _, err = run_cli("merge", tmp_path / "out", *expert_args(world, ("a", "b")), "--expert", f"odd={odd}")
    assert code == 2 and "tokenizer file tokenizer.json differs between odd and a" in err


def test_a_tensor_stored_with_another_shape_is_refused_with_its_name(tmp_path, world, run_cli):
    from safetensors.torch import load_file, save_file

    odd = save_member(tmp_path / "odd", seed=5, tokenizer=False)
    tensors = load_file(odd / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:40]
    save_file(tensors, odd / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli("merge", tmp_path / "out", *expert_args(world, ("a",)), "--expert", f"odd={odd}")
    assert code == 2 and "'model.layers.0.mlp.up_proj.weight' has shape [40, 32]" in err


def test_rope_in_4x_and_5x_forms_compares_equal():
    from surgery.btx.compatibility import rope_settings

    assert rope_settings({"rope_theta": 10000}) == rope_settings({"rope_parameters": {"rope_type": "default",
                                                                                      "rope_theta": 10000.0}})
    assert rope_settings({"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}}) == \
        rope_settings({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})
    assert rope_settings({"rope_scaling": {"type": "linear", "factor": 2.0}}) != \
        rope_settings({"rope_scaling": {"type": "linear", "factor": 4.0}})


@pytest.mark.parametrize("args,message", [
    (["--top-k", "4"], "--top-k 4: must be between 1 and the number of experts (3)"),
    (["--top-k", "0"], "--top-k 0: must be between 1"),
    (["--non-ffn", "zz"], "--non-ffn 'zz': expected auto, average, regmean, regmean++, seed or an expert name"),
    (["--non-ffn", "seed"], "--non-ffn seed needs --seed PATH"),
    (["--include-seed"], "--include-seed needs --seed PATH"),
    (["--weights", "zz=1"], "--weights names 'zz', which is not a model of this merge"),
    (["--weights", "a=-1"], "weight must be a finite number >= 0"),
    (["--expert", "a=/elsewhere"], "expert name 'a' is given twice"),
])
def test_bad_options_are_refused_before_writing(tmp_path, world, run_cli, args, message):
    code, _, err = run_cli("merge", tmp_path / "out", *expert_args(world), *args)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_one_expert_is_refused(tmp_path, world, run_cli):
    code, _, err = run_cli("merge", tmp_path / "out", *expert_args(world, ("a",)), "--top-k", "1")
    assert code == 2 and "a merge needs at least 2 experts, found 1" in err


# ------------------------------------------------------------------ YAML
def test_our_yaml_config_gives_the_same_output_as_the_command_line(tmp_path, world, run_cli):
    import yaml

    config = {"experts": [{"name": n, "path": str(world[n]), "calibration": str(world[n + ".txt"])} for n in "abc"],
              "seed": str(world["seed"]), "router_init": "calibrated", "top_k": 2}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    assert run_cli("merge", tmp_path / "yaml", "--config", tmp_path / "merge.yml")[0] == 0
    assert run_cli("merge", tmp_path / "cli", "--seed", world["seed"], *expert_args(world), *calibration_args(world),
                   "--router-init", "calibrated")[0] == 0
    assert digest(tmp_path / "yaml") == digest(tmp_path / "cli")


def test_mergekit_moe_yaml_is_accepted_and_mapped_with_notes(tmp_path, world, run_cli):
    import yaml

    config = {"base_model": str(world["seed"]), "gate_mode": "hidden", "dtype": "bfloat16", "experts_per_token": 1,
              "architecture": "mixtral",
              "experts": [{"source_model": str(world[n]), "positive_prompts": [TEXTS[n][:200]]} for n in "abc"]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
    code, _, err = run_cli("merge", tmp_path / "out", "--config", tmp_path / "mk.yml")
    assert code == 0, err
    notes = " ".join(err.split())  # the console wraps long lines
    assert "AVERAGED over a, b, c, seed (BTX)" in notes and "gate_mode hidden -> router_init calibrated" in notes
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_local_experts"] == 3 and config["num_experts_per_tok"] == 1
    out = tensors_of(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert torch.count_nonzero(out["model.layers.0.block_sparse_moe.gate.weight"]) > 0
    experts = json.loads(next(iter(Checkpoint.open(tmp_path / "out").metadata.values()))["surgery_experts"])
    assert [e["name"] for e in experts] == ["a", "b", "c"]
    load_model(tmp_path / "out")


def test_command_line_options_override_the_yaml(tmp_path, world, run_cli):
    import yaml

    config = {"base_model": str(world["seed"]), "gate_mode": "random",
              "experts": [{"source_model": str(world[n])} for n in "ab"]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
    code, _, err = run_cli("merge", tmp_path / "out", "--config", tmp_path / "mk.yml", "--non-ffn", "seed")
    assert code == 0, err
    assert torch.equal(tensors_of(tmp_path / "out")["lm_head.weight"], tensors_of(world["seed"])["lm_head.weight"])


def test_unknown_yaml_keys_are_refused_with_the_key_named(tmp_path, world, run_cli):
    (tmp_path / "m.yml").write_text(f"experts:\n  - {{name: a, path: {world['a']}}}\nexpert_count: 3\n")
    code, _, err = run_cli("merge", tmp_path / "out", "--config", tmp_path / "m.yml")
    assert code == 2 and "unknown key 'expert_count'" in err


def test_blocked_mean_equals_the_plan_weighted_mean_bit_exactly(world):
    from surgery.plan.mean import WeightedMean
    from surgery.plan.nodes import Copy

    checkpoints = [Checkpoint.open(world[name]) for name in ("a", "b", "seed")]
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.self_attn.o_proj.weight"):
        whole = WeightedMean([Copy(c, name) for c in checkpoints], [1.0, 2.5, 0.5]).compute_with_torch()
        blocked = WeightedMean([Copy(c, name) for c in checkpoints], [1.0, 2.5, 0.5],
                               block_bytes=300).compute()  # 2-3 rows per block
        assert torch.equal(whole, blocked)


def test_blocked_mean_of_bf16_models_equals_the_plan_weighted_mean(tmp_path):
    from surgery.plan.mean import WeightedMean
    from surgery.plan.nodes import Copy

    checkpoints = [Checkpoint.open(save_model(tmp_path / str(seed), "llama", seed=seed, dtype="bfloat16"))
                   for seed in (1, 2)]
    for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        whole = WeightedMean([Copy(c, name) for c in checkpoints], [1.0, 3.0]).compute_with_torch()
        blocked = WeightedMean([Copy(c, name) for c in checkpoints], [1.0, 3.0], block_bytes=500)
        assert torch.equal(whole, blocked.compute())


def test_verify_validates_the_output_against_every_source(tmp_path, world, run_cli, monkeypatch):
    from surgery.checks import report_view, validation

    calls = []
    monkeypatch.setattr(validation, "validate",
                        lambda out, references, **options: calls.append((out, references)) or {"loss": None})
    monkeypatch.setattr(report_view, "print_result", lambda result: None)
    code, _, err = run_cli("merge", tmp_path / "out", "--seed", world["seed"], *expert_args(world, ("a", "b")),
                           "--router-init", "zero", "--verify")
    assert code == 0, err
    assert calls == [(str(tmp_path / "out"), [str(world["a"]), str(world["b"]), str(world["seed"])])]
