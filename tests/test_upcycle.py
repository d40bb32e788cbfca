"""`surgery upcycle`: dense -> MoE that reproduces the source exactly, plus deliberate diversity.

Exactness is checked by loading source and output with transformers (strict: no missing or
unexpected key) and comparing logits in float32: max abs difference <= 1e-5. bf16 sources are
loaded in float32 too and held to the same bound: every written weight is a source value times a
power of two (1, 2, 1/2), which bf16 represents exactly, so only float32 summation order differs.
"""

import hashlib
import json
import sys
import types

import pytest
import torch
from tiny_models import load_model, logits, router_inputs_by_hooks, sample_ids, save_model

from surgery.io.checkpoint import Checkpoint

TOLERANCE = 1e-5

# (source family, --format, extra options): every format each dense family can become, plain,
# granular and (qwen2_moe) with the dense FFN as shared expert.
EXACT_CASES = [
    ("llama", "mixtral", []),
    ("llama", "mixtral", ["--granularity", "2"]),
    ("llama", "qwen2_moe", []),
    ("llama", "qwen2_moe", ["--granularity", "2"]),
    ("llama", "qwen2_moe", ["--shared-expert"]),
    ("mistral", "mixtral", []),
    ("mistral", "mixtral", ["--granularity", "2"]),
    ("qwen2", "qwen2_moe", []),
    ("qwen2", "qwen2_moe", ["--granularity", "2"]),
    ("qwen2", "qwen2_moe", ["--shared-expert"]),
    ("qwen2", "qwen2_moe", ["--shared-expert", "--granularity", "2"]),
    ("qwen3", "qwen3_moe", []),
    ("qwen3", "qwen3_moe", ["--granularity", "2"]),
]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """source(family, dtype="float32", **config) -> a tiny saved dense model, built once per module."""
    built = {}

    def get(family, dtype="float32", **overrides):
        key = (family, dtype, tuple(sorted(overrides.items())))
        if key not in built:
            directory = tmp_path_factory.mktemp(f"{family}-{dtype}")
            built[key] = save_model(directory, family, dtype=dtype, **overrides)
        return built[key]

    return get


def load_moe(directory):
    model = load_model(directory)  # strict: fails on missing / unexpected / mismatched keys
    model.set_experts_implementation("eager")  # grouped_mm on CPU needs 16-byte expert strides
    return model


_REFERENCE_LOGITS = {}


def max_logit_difference(src, out) -> float:
    ids = sample_ids()
    if str(src) not in _REFERENCE_LOGITS:  # sources are built once per module and never change
        _REFERENCE_LOGITS[str(src)] = logits(load_model(src), ids)
    return float((_REFERENCE_LOGITS[str(src)] - logits(load_moe(out), ids)).abs().max())


def tensors_of(directory):
    checkpoint = Checkpoint.open(directory)
    return {name: checkpoint.read(name) for name in checkpoint.tensors}


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def config_of(directory):
    return json.loads((directory / "config.json").read_text())


def upcycle(run_cli, src, out, *options):
    code, stdout, stderr = run_cli("upcycle", src, out, *options)
    assert code == 0, stderr
    return " ".join(stderr.split())  # rich wraps long notes


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family,fmt,extra", EXACT_CASES, ids=lambda v: "-".join(v) if isinstance(v, list) else v)
def test_output_loads_and_reproduces_the_source(tmp_path, run_cli, source, family, fmt, extra, dtype):
    src = source(family, dtype)
    upcycle(run_cli, src, tmp_path / "out", "--num-experts", "4", "--top-k", "2", "--format", fmt, *extra)
    assert config_of(tmp_path / "out")["model_type"] == fmt
    assert max_logit_difference(src, tmp_path / "out") <= TOLERANCE


@pytest.mark.parametrize("router_init,top_k", [("normal", 1), ("normal", 6), ("uniform", 3), ("zero", 1), ("zero", 5)])
def test_any_router_init_and_any_top_k_is_exact(tmp_path, run_cli, source, router_init, top_k):
    src = source("llama")
    upcycle(run_cli, src, tmp_path / "out", "-n", "6", "-k", top_k, "--router-init", router_init, "--seed", "7")
    assert max_logit_difference(src, tmp_path / "out") <= TOLERANCE


@pytest.mark.parametrize("router_init,experts,top_k,granularity",
                         [("normal", 8, 4, 4), ("uniform", 8, 2, 2), ("normal", 4, 4, 2), ("uniform", 8, 6, 2)])
def test_granular_upcycling_is_exact_with_shared_expert(tmp_path, run_cli, source, router_init, experts, top_k,
                                                        granularity):
    src = source("qwen2")
    upcycle(run_cli, src, tmp_path / "out", "-n", experts, "-k", top_k, "-g", granularity, "--shared-expert",
            "--router-init", router_init)
    assert max_logit_difference(src, tmp_path / "out") <= TOLERANCE


def test_zero_router_is_exact_for_granular_when_every_expert_is_used(tmp_path, run_cli, source):
    src = source("qwen3")
    upcycle(run_cli, src, tmp_path / "out", "-n", "4", "-k", "4", "-g", "2", "--router-init", "zero")
    assert max_logit_difference(src, tmp_path / "out") <= TOLERANCE


def test_only_the_chosen_layers_become_moe(tmp_path, run_cli, source):
    src = source("qwen3", num_hidden_layers=3)
    upcycle(run_cli, src, tmp_path / "out", "-n", "4", "-k", "2", "--moe-layers", "every-other")
    config = config_of(tmp_path / "out")
    assert config["mlp_only_layers"] == [0, 2]
    names = set(Checkpoint.open(tmp_path / "out").tensors)
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.1.mlp.gate.weight" in names
    assert not any(name.startswith("model.layers.0.mlp.experts.") for name in names)
    assert max_logit_difference(src, tmp_path / "out") <= TOLERANCE


# ------------------------------------------------------------------------------ the recipes
def test_mixtral_experts_are_copies_and_config_carries_the_source(tmp_path, run_cli, source):
    src = source("mistral")
    upcycle(run_cli, src, tmp_path / "out", "-n", "3", "-k", "2")
    dense, moe = tensors_of(src), tensors_of(tmp_path / "out")
    for expert in range(3):
        prefix = f"model.layers.1.block_sparse_moe.experts.{expert}."
        assert torch.equal(moe[prefix + "w1.weight"], dense["model.layers.1.mlp.gate_proj.weight"])
        assert torch.equal(moe[prefix + "w3.weight"], dense["model.layers.1.mlp.up_proj.weight"])
        assert torch.equal(moe[prefix + "w2.weight"], dense["model.layers.1.mlp.down_proj.weight"])
    config, source_config = config_of(tmp_path / "out"), config_of(src)
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (3, 2, 44)
    assert config["sliding_window"] == source_config["sliding_window"]
    assert config["rms_norm_eps"] == source_config["rms_norm_eps"]


def test_granular_expert_is_a_neuron_shard_with_down_scaled_by_g(tmp_path, run_cli, source):
    src = source("qwen3")
    upcycle(run_cli, src, tmp_path / "out", "-n", "8", "-k", "4", "-g", "4")
    dense, moe = tensors_of(src), tensors_of(tmp_path / "out")
    assert config_of(tmp_path / "out")["moe_intermediate_size"] == 11
    for expert in range(8):
        shard = slice(11 * (expert % 4), 11 * (expert % 4 + 1))
        prefix = f"model.layers.0.mlp.experts.{expert}."
        assert torch.equal(moe[prefix + "gate_proj.weight"], dense["model.layers.0.mlp.gate_proj.weight"][shard])
        assert torch.equal(moe[prefix + "up_proj.weight"], dense["model.layers.0.mlp.up_proj.weight"][shard])
        assert torch.equal(moe[prefix + "down_proj.weight"], 4 * dense["model.layers.0.mlp.down_proj.weight"][:, shard])
    router = moe["model.layers.0.mlp.gate.weight"]
    assert torch.equal(router, router[::4].repeat_interleave(4, dim=0)) and not torch.equal(router[0], router[4])


def test_shared_expert_is_the_dense_ffn_and_routed_experts_carry_the_other_half(tmp_path, run_cli, source):
    src = source("qwen2")
    upcycle(run_cli, src, tmp_path / "out", "-n", "4", "-k", "2", "--shared-expert")
    dense, moe = tensors_of(src), tensors_of(tmp_path / "out")
    mlp = "model.layers.1.mlp."
    assert config_of(tmp_path / "out")["shared_expert_intermediate_size"] == 44
    for role in ("gate_proj", "up_proj", "down_proj"):
        assert torch.equal(moe[f"{mlp}shared_expert.{role}.weight"], dense[f"{mlp}{role}.weight"])
    assert torch.count_nonzero(moe[mlp + "shared_expert_gate.weight"]) == 0
    assert torch.equal(moe[mlp + "experts.3.down_proj.weight"], dense[mlp + "down_proj.weight"] / 2)
    assert torch.equal(moe[mlp + "experts.3.up_proj.weight"], dense[mlp + "up_proj.weight"])


def test_qwen2_moe_without_shared_expert_gets_an_inert_zero_one(tmp_path, run_cli, source):
    src = source("qwen2")
    stderr = upcycle(run_cli, src, tmp_path / "out", "-n", "4", "-k", "2")
    moe = tensors_of(tmp_path / "out")
    assert config_of(tmp_path / "out")["shared_expert_intermediate_size"] == 8
    shared = [name for name in moe if ".shared_expert" in name]
    assert len(shared) == 2 * 4 and all(torch.count_nonzero(moe[name]) == 0 for name in shared)
    assert "inert all-zero" in stderr


def test_router_init_follows_the_option_and_seed(tmp_path, run_cli, source):
    src = source("llama")
    routers = {}
    for init, seed in [("normal", 0), ("normal", 1), ("uniform", 0), ("zero", 0)]:
        out = tmp_path / f"{init}-{seed}"
        upcycle(run_cli, src, out, "-n", "8", "-k", "2", "--router-init", init, "--seed", seed, "--router-std", "0.5")
        routers[init, seed] = tensors_of(out)["model.layers.0.block_sparse_moe.gate.weight"]
    assert abs(float(routers["normal", 0].std()) - 0.5) < 0.1
    assert not torch.equal(routers["normal", 0], routers["normal", 1])
    assert float(routers["uniform", 0].abs().max()) <= 1 / 32 ** 0.5
    assert torch.count_nonzero(routers["zero", 0]) == 0


def test_dtype_option_casts_the_output(tmp_path, run_cli, source):
    src = source("llama")
    upcycle(run_cli, src, tmp_path / "out", "-n", "2", "-k", "1", "--dtype", "bf16")
    assert {info.dtype for info in Checkpoint.open(tmp_path / "out").tensors.values()} == {"BF16"}
    assert config_of(tmp_path / "out")["dtype"] == "bfloat16"


def test_bf16_granularity_that_is_not_a_power_of_two_warns_about_rounding(tmp_path, run_cli, source):
    code, _, err = run_cli("upcycle", source("llama", "bfloat16"), tmp_path / "out", "-n", "11", "-k", "11",
                           "-g", "11", "--dry-run")
    assert code == 0 and "scaled by 11, not a power of two: in BF16" in " ".join(err.split())


# ------------------------------------------------------------------------------ calibrated router
def test_calibrated_router_is_exact_and_deterministic(tmp_path, run_cli, source, token_file):
    src = source("qwen2")
    options = ["-n", "4", "-k", "2", "-g", "2", "--router-init", "calibrated", "--calibration", token_file]
    stderr = upcycle(run_cli, src, tmp_path / "a", *options)
    upcycle(run_cli, src, tmp_path / "b", *options)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert "calibrated routers on 320 tokens" in stderr
    router = tensors_of(tmp_path / "a")["model.layers.0.mlp.gate.weight"]
    assert torch.equal(router, router[::2].repeat_interleave(2, dim=0)) and not torch.equal(router[0], router[2])
    assert torch.allclose(router.norm(dim=1), torch.full((4,), 0.02 * 32 ** 0.5))
    assert max_logit_difference(src, tmp_path / "a") <= TOLERANCE


def test_calibrated_router_rows_fit_the_router_inputs_better_than_random_rows(tmp_path, run_cli, source, token_file):
    """k-means rows point into the data: tokens are closer (cosine) to their best row than with random rows."""
    from surgery.execution.batches import batches
    from surgery.io.data_files import read_token_ids

    src = source("llama")
    for init in ("calibrated", "normal"):
        upcycle(run_cli, src, tmp_path / init, "-n", "4", "-k", "1", "--router-init", init,
                *(["--calibration", token_file] if init == "calibrated" else []))
    inputs = torch.nn.functional.normalize(
        router_inputs_by_hooks(load_model(src), batches(read_token_ids(token_file), 4, 256), [1])[1], dim=1)
    fit = {}
    for init in ("calibrated", "normal"):
        router = tensors_of(tmp_path / init)["model.layers.1.block_sparse_moe.gate.weight"]
        cosine = inputs @ torch.nn.functional.normalize(router, dim=1).T
        fit[init] = float(cosine.max(dim=1).values.mean())
        if init == "calibrated":
            assert len(set(cosine.argmax(dim=1).tolist())) == 4  # every row is the best match of some tokens
    assert fit["calibrated"] > fit["normal"] + 0.1


def add_word_tokenizer(directory, vocab_size=96):
    """A word-level tokenizer over the most common words of the shipped sample text."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers

    from surgery.io.data_files import SAMPLE_TEXT

    words = Counter(SAMPLE_TEXT.read_text().split()).most_common(vocab_size - 3)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{word: i + 3 for i, (word, _) in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def test_calibrated_router_defaults_to_the_shipped_sample_text(tmp_path, run_cli, source):
    src = tmp_path / "src"
    save_model(src, "qwen3")
    add_word_tokenizer(src)
    stderr = upcycle(run_cli, src, tmp_path / "out", "-n", "4", "-k", "2", "--router-init", "calibrated")
    assert "running src on the shipped sample text" in stderr and "calibrated routers on 2048 tokens" in stderr
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert max_logit_difference(src, tmp_path / "out") <= TOLERANCE


def test_calibration_text_without_tokenizer_is_refused(tmp_path, run_cli, source):
    (tmp_path / "text.txt").write_text("some calibration text\n")
    code, _, err = run_cli("upcycle", source("llama"), tmp_path / "out", "-n", "4", "-k", "2",
                           "--router-init", "calibrated", "--calibration", tmp_path / "text.txt")
    assert code == 2 and "no tokenizer" in err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ diversity
def neurons_that_differ(moe, dense, prefix, layer, role_names):
    """Sets of neuron indices that differ from the dense FFN in gate rows, up rows and down columns."""
    gate, up, down = (moe[prefix + name] for name in role_names)
    dense_gate, dense_up, dense_down = (dense[f"model.layers.{layer}.mlp.{r}_proj.weight"] for r in ("gate", "up", "down"))
    rows = lambda a, b: {i for i in range(a.shape[0]) if not torch.equal(a[i], b[i])}
    return rows(gate, dense_gate), rows(up, dense_up), rows(down.T, dense_down.T)


@pytest.mark.parametrize("flag,fraction", [(["--drop-upcycle", "0.5"], 0.5),
                                           (["--noise", "0.5", "--noise-fraction", "0.25"], 0.25)])
def test_diversity_changes_exactly_the_chosen_neurons_of_each_expert(tmp_path, run_cli, source, flag, fraction):
    src = source("llama")
    stderr = upcycle(run_cli, src, tmp_path / "out", "-n", "4", "-k", "2", *flag)
    assert "exactness is broken on purpose" in stderr
    dense, moe = tensors_of(src), tensors_of(tmp_path / "out")
    chosen = []
    for layer in range(2):
        for expert in range(4):
            prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
            gate, up, down = neurons_that_differ(moe, dense, prefix, layer, ("w1.weight", "w3.weight", "w2.weight"))
            assert gate == up == down and len(gate) == round(44 * fraction)
            chosen.append(frozenset(gate))
    assert len(set(chosen)) == len(chosen)  # different neurons for every expert of every layer
    assert max_logit_difference(src, tmp_path / "out") > 1e-3


def test_drop_upcycle_redraws_from_the_original_matrix_statistics(tmp_path, run_cli, source):
    src = source("qwen3")
    upcycle(run_cli, src, tmp_path / "out", "-n", "4", "-k", "2", "-g", "2", "--drop-upcycle", "1")
    dense, moe = tensors_of(src), tensors_of(tmp_path / "out")
    original = dense["model.layers.0.mlp.down_proj.weight"] * 2  # granular experts carry down_proj x G
    redrawn = torch.cat([moe[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] for e in range(4)], dim=1)
    assert abs(float(redrawn.std()) / float(original.std()) - 1) < 0.1
    assert abs(float(redrawn.mean()) - float(original.mean())) < 0.2 * float(original.std())


def test_granular_drop_upcycle_uses_shard_sized_neuron_sets(tmp_path, run_cli, source):
    src = source("qwen3")
    upcycle(run_cli, src, tmp_path / "out", "-n", "4", "-k", "2", "-g", "2", "--drop-upcycle", "0.5")
    moe, dense = tensors_of(tmp_path / "out"), tensors_of(src)
    gate = moe["model.layers.0.mlp.experts.1.gate_proj.weight"]
    changed = {i for i in range(22) if not torch.equal(gate[i], dense["model.layers.0.mlp.gate_proj.weight"][22 + i])}
    assert len(changed) == 11


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path, run_cli, source):
    src = source("qwen2")
    options = ["-n", "4", "-k", "2", "--drop-upcycle", "0.3", "--noise", "0.1", "--noise-fraction", "0.5",
               "--max-shard-size", "40KB"]
    upcycle(run_cli, src, tmp_path / "a", *options, "--seed", "5")
    upcycle(run_cli, src, tmp_path / "b", *options, "--seed", "5")
    upcycle(run_cli, src, tmp_path / "c", *options, "--seed", "6")
    assert len(digest(tmp_path / "a")) > 3 and digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_diversity_functions_touch_only_the_given_neurons():
    from surgery.plan import diversity

    weight = torch.randn(10, 6)
    dropped = diversity.drop_reinit(weight, [1, 4], axis=1, mean=5.0, std=0.0, seed=0)
    assert torch.equal(dropped[:, [1, 4]], torch.full((10, 2), 5.0))
    assert torch.equal(dropped[:, [0, 2, 3, 5]], weight[:, [0, 2, 3, 5]])
    noisy = diversity.add_noise(weight, [2], axis=0, std=1.0, seed=0)
    assert torch.equal(noisy[[0, 1, 3]], weight[[0, 1, 3]]) and not torch.equal(noisy[2], weight[2])
    assert diversity.choose_neurons(44, 0.5, seed=9) == diversity.choose_neurons(44, 0.5, seed=9)
    assert len(diversity.choose_neurons(11, 0.5, seed=9)) == 6


def test_matrix_stats_match_torch_in_float64_when_computed_in_blocks():
    from surgery.plan import diversity

    weight = torch.randn(300, 70, generator=torch.Generator().manual_seed(1)) * 0.3 + 0.1
    std, mean = torch.std_mean(weight.double())
    assert diversity.matrix_stats(weight, block_elements=1000) == pytest.approx((float(mean), float(std)), rel=1e-12)


# ------------------------------------------------------------------------------ refusals
REFUSALS = [
    (["-n", "4", "-k", "5"], "--top-k 5: must be between 1 and --num-experts (4)"),
    (["-n", "1", "-k", "1"], "--num-experts 1: an MoE layer needs at least 2 experts"),
    (["-n", "6", "-k", "3", "-g", "3"], "intermediate_size 44 is not divisible by --granularity 3"),
    (["-n", "4", "-k", "1", "-g", "2"], "--top-k 1 is not a multiple of --granularity 2"),
    (["-n", "6", "-k", "2", "-g", "4"], "--num-experts 6 is not a multiple of --granularity 4"),
    (["-n", "4", "-k", "2", "--moe-layers", "1"], "mixtral makes every layer MoE; --moe-layers must be 'all'"),
    (["-n", "4", "-k", "2", "--noise", "0.1", "--noise-fraction", "1.5"], "--noise-fraction 1.5: must be a fraction"),
    (["-n", "4", "-k", "2", "--drop-upcycle", "-0.1"], "--drop-upcycle -0.1: must be a fraction"),
    (["-n", "4", "-k", "2", "--noise-fraction", "0.5"], "--noise-fraction needs --noise SIGMA"),
    (["-n", "4", "-k", "2", "-g", "2", "--router-init", "zero"], "a zero router ties every expert"),
    (["-n", "4", "-k", "2", "--shared-expert"], "format mixtral has no shared expert"),
    (["-n", "4", "-k", "2", "--format", "qwen3_moe"], "a llama model cannot become qwen3_moe"),
    (["-n", "4", "-k", "2", "--seed", "-1"], "--seed -1: must be a non-negative integer"),
    (["-n", "4", "-k", "2", "--calibration", "x.txt"], "--calibration applies to --router-init calibrated only"),
]


@pytest.mark.parametrize("options,message", REFUSALS, ids=[m[:30] for _, m in REFUSALS])
def test_impossible_options_are_refused_before_writing(tmp_path, run_cli, source, options, message):
    src = source("llama")
    before = digest(src)
    code, _, err = run_cli("upcycle", src, tmp_path / "out", *options)
    assert code == 2 and message in err and err.startswith("surgery: error:") and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    assert digest(src) == before


def test_bias_source_into_mixtral_is_refused(tmp_path, run_cli, source):
    code, _, err = run_cli("upcycle", source("llama", attention_bias=True), tmp_path / "out", "-n", "4", "-k", "2")
    assert code == 2 and "attention_bias is true, but mixtral has no such weights" in err
    assert not (tmp_path / "out").exists()


def test_moe_source_is_refused(tmp_path, run_cli, source):
    code, _, err = run_cli("upcycle", source("mixtral"), tmp_path / "out", "-n", "4", "-k", "2")
    assert code == 2 and "already an MoE model" in err


# ------------------------------------------------------------------------------ plan and verify
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, run_cli, source):
    code, out, _ = run_cli("upcycle", source("llama"), tmp_path / "out", "-n", "4", "-k", "2", "-g", "2",
                           "--dry-run", "--json")
    plan = json.loads(out)
    assert code == 0 and not (tmp_path / "out").exists()
    recipes = {t["name"]: t["recipe"] for t in plan["tensors"]}
    assert recipes["model.layers.0.block_sparse_moe.gate.weight"].startswith("repeat each row x2(init normal")
    assert recipes["model.layers.0.block_sparse_moe.experts.3.w2.weight"].startswith("2 * cols[22:44] of ")


@pytest.fixture
def fake_validate(monkeypatch):
    """A stand-in surgery.checks.post_write with its contract (verify_written raises SurgeryError when not exact)."""
    from surgery.errors import SurgeryError

    module = types.ModuleType("surgery.checks.post_write")
    module.calls, module.exact = [], True

    def verify_written(out, sources, *, exact, settings=None, max_tokens=None, rounding=None):
        module.calls.append(("verify_written", str(out), [str(s) for s in sources], exact))
        if exact and not module.exact:
            raise SurgeryError(f"--verify: {out} does not reproduce {sources[0]}: layer 1: MoE output differs from the "
                               f"dense FFN by 0.5 (the output is kept for inspection; the input is untouched)")
        return {"passed": True}

    module.verify_written = verify_written
    monkeypatch.setitem(sys.modules, "surgery.checks.post_write", module)  # what `write` imports when it verifies
    return module


def test_verify_checks_exactness_after_writing(tmp_path, run_cli, source, fake_validate):
    src = source("llama")
    upcycle(run_cli, src, tmp_path / "out", "-n", "4", "-k", "2", "--verify")
    assert fake_validate.calls == [("verify_written", str(tmp_path / "out"), [str(src)], True)]


def test_verify_fails_with_exit_2_when_not_exact_and_keeps_the_input(tmp_path, run_cli, source, fake_validate):
    src = source("llama")
    before = digest(src)
    fake_validate.exact = False
    code, _, err = run_cli("upcycle", src, tmp_path / "out", "-n", "4", "-k", "2", "--verify")
    assert code == 2 and "--verify:" in err and "does not reproduce" in err and digest(src) == before


def test_verify_with_diversity_reports_the_loss_change_instead(tmp_path, run_cli, source, fake_validate):
    src = source("llama")
    upcycle(run_cli, src, tmp_path / "out", "-n", "4", "-k", "2", "--drop-upcycle", "0.5", "--verify")
    assert fake_validate.calls == [("verify_written", str(tmp_path / "out"), [str(src)], False)]


def test_verify_with_the_real_validator_passes_on_a_granular_shared_upcycle(tmp_path, run_cli, source):
    src = source("qwen2")
    upcycle(run_cli, src, tmp_path / "out", "-n", "4", "-k", "2", "-g", "2", "--shared-expert", "--verify")


def test_with_defaults_only_an_upcycle_of_the_demo_model_uses_every_expert_in_every_layer(tmp_path, run_cli):
    """The default normal router breaks every tie: no expert is left unused at top-2 of 8."""
    from conftest import DEMO_MODEL

    from surgery.checks.validation import validate

    upcycle(run_cli, DEMO_MODEL, tmp_path / "out", "-n", "8", "-k", "2")
    routing = validate(tmp_path / "out", device="cpu", max_tokens=2048)["routing"]
    assert len(routing) == 4 and all(layer["unused_experts"] == [] for layer in routing)


def test_the_dtype_note_is_true_the_output_is_the_source_cast(tmp_path, run_cli, source):
    src = source("llama")
    err = upcycle(run_cli, src, tmp_path / "out", "-n", "4", "-k", "2", "--dtype", "bf16")
    assert "--dtype bf16 rounds the weights: the result reproduces the source cast to bf16" in err
    moe, dense = tensors_of(tmp_path / "out"), tensors_of(src)
    assert torch.equal(moe["model.layers.1.block_sparse_moe.experts.3.w2.weight"],
                       dense["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16))
    assert torch.equal(moe["model.embed_tokens.weight"], dense["model.embed_tokens.weight"].to(torch.bfloat16))
