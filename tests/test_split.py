"""`surgery split`: exactness at k = N, the shared part, partition claims, determinism, refusals.

Exactness is checked by loading the output with transformers (strict keys) and comparing fp32
logits with the dense source: max abs difference <= 1e-5.
"""

import hashlib
import json

import numpy as np
import pytest
import torch
from tiny_models import load_model, logits, sample_ids, save_model

from surgery.io.checkpoint import Checkpoint

STRATEGIES = ["random", "clustering", "sharing-inner", "sharing-inter", "shared-norm", "coactivation"]
FORMATS = [("llama", "mixtral"), ("llama", "qwen2_moe"), ("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe")]
EXACT = 1e-5
FFN = 44  # tiny_models intermediate_size


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread avoids thread hand-off costs on a busy machine (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {family: save_model(root / family, family, seed=1) for family in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """Pre-tokenised calibration ids (the tiny models have no tokenizer): 24 rows of 40 ids."""
    path = tmp_path_factory.mktemp("calibration") / "ids.jsonl"
    generator = np.random.default_rng(0)
    path.write_text("".join(json.dumps(generator.integers(3, 96, 40).tolist()) + "\n" for _ in range(24)))
    return path


DENSE_LOGITS = {}


def max_difference(source, out):
    ids = sample_ids()
    if source not in DENSE_LOGITS:
        DENSE_LOGITS[source] = logits(load_model(source), ids)
    return (DENSE_LOGITS[source] - logits(load_model(out), ids)).abs().max().item()


def split(run_cli, source, out, *args):
    code, stdout, stderr = run_cli("split", source, out, *args)
    assert code == 0, stderr
    return stderr


def read_tensors(directory):
    checkpoint = Checkpoint.open(directory)
    return {name: checkpoint.read(name) for name in checkpoint.tensors}


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("family, fmt", FORMATS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_k_equals_n_with_a_zero_router_reproduces_the_dense_logits(tmp_path, run_cli, sources, calibration,
                                                                   strategy, family, fmt):
    split(run_cli, sources[family], tmp_path / "out", "-n", 4, "-k", 4, "--strategy", strategy, "--format", fmt,
          "--calibration", calibration)
    assert max_difference(sources[family], tmp_path / "out") <= EXACT


def test_qwen2_moe_without_shared_neurons_gets_the_same_inert_shared_expert_as_upcycle(tmp_path, run_cli, sources):
    from surgery.plan.moe import INERT_SHARED_FFN

    split(run_cli, sources["llama"], tmp_path / "out", "-n", 4, "-k", 4, "--strategy", "random", "--format", "qwen2_moe")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == INERT_SHARED_FFN == 8
    shared = {name: value for name, value in read_tensors(tmp_path / "out").items() if ".shared_expert" in name}
    assert shared and all(not value.any() for value in shared.values())
    assert max_difference(sources["llama"], tmp_path / "out") <= EXACT


def test_uneven_split_is_padded_with_zero_neurons_and_stays_exact(tmp_path, run_cli, sources):
    err = split(run_cli, sources["llama"], tmp_path / "out", "-n", 8, "-k", 8, "--strategy", "random")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["intermediate_size"] == 6  # 44 = 4 x 6 + 4 x 5
    assert "padded with 8 zero neurons" in " ".join(err.split())  # 4 experts x 1 neuron x 2 layers
    assert max_difference(sources["llama"], tmp_path / "out") <= EXACT


def test_moe_layers_keeps_the_other_layers_dense_and_exact(tmp_path, run_cli, sources):
    split(run_cli, sources["qwen2"], tmp_path / "out", "-n", 4, "-k", 4, "--strategy", "clustering", "--moe-layers", "1")
    names = set(Checkpoint.open(tmp_path / "out").tensors)
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.1.mlp.gate.weight" in names
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mlp_only_layers"] == [0]
    assert max_difference(sources["qwen2"], tmp_path / "out") <= EXACT


def dense_part(source, layer, neurons, x):
    """The dense FFN restricted to `neurons`: down[:, S] (silu(gate[S] x) * up[S] x)."""
    checkpoint = Checkpoint.open(source)
    prefix = f"model.layers.{layer}.mlp."
    gate, up, down = (checkpoint.read(prefix + f"{role}_proj.weight") for role in ("gate", "up", "down"))
    h = torch.nn.functional.silu(x @ gate[neurons].T) * (x @ up[neurons].T)
    return h @ down[:, neurons].T


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe"])
def test_shared_neurons_count_once_for_any_router_and_top_k(tmp_path, run_cli, sources, fmt):
    """With a random router and k < N, the MoE minus its shared part's weights differs from the MoE by
    exactly the dense FFN restricted to the shared neurons."""
    split(run_cli, sources["llama"], tmp_path / "out", "-n", 4, "-k", 2, "--strategy", "shared-norm",
          "--shared-neurons", 8, "--router-init", "normal", "--format", fmt, "--save-partition", tmp_path / "p.json")
    shared = json.loads((tmp_path / "p.json").read_text())["layers"]["0"]["shared"]
    block = load_model(tmp_path / "out").model.layers[0].mlp
    x = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = block(x)
        if fmt == "mixtral":  # duplicated: the last 8 of each expert's 9 + 8 neurons
            block.experts.down_proj[:, :, 9:] = 0
        else:
            block.shared_expert.down_proj.weight.zero_()
        without_shared = block(x)
    expected = dense_part(sources["llama"], 0, shared, x)
    assert (full - without_shared - expected).abs().max().item() <= EXACT


# ------------------------------------------------------------------ what each strategy claims
def saved_partition(tmp_path, run_cli, source, calibration, strategy, *extra):
    path = tmp_path / "partition.json"
    split(run_cli, source, tmp_path / "out", "-n", 4, "-k", 2, "--strategy", strategy, "--calibration", calibration,
          "--save-partition", path, *extra)
    data = json.loads(path.read_text())
    assert data["strategy"] == strategy and data["num_experts"] == 4 and data["intermediate_size"] == FFN
    assert sorted(data["layers"]) == ["0", "1"]
    return data["layers"]


@pytest.mark.parametrize("strategy, shared", [("random", 0), ("clustering", 0), ("coactivation", 0),
                                              ("sharing-inter", FFN - 4 * (FFN // 5)), ("shared-norm", FFN - 4 * (FFN // 5))])
def test_partitioning_strategies_put_every_neuron_in_exactly_one_place(tmp_path, run_cli, sources, calibration,
                                                                       strategy, shared):
    for layer in saved_partition(tmp_path, run_cli, sources["llama"], calibration, strategy).values():
        placed = sorted(sum(layer["experts"], []) + layer["shared"])
        assert placed == list(range(FFN))
        assert len(layer["shared"]) == shared
        assert sorted(len(e) for e in layer["experts"]) == [(FFN - shared) // 4] * 4


def test_clustering_is_exactly_balanced_and_reports_its_cosine_spread(tmp_path, run_cli, sources, calibration):
    path = tmp_path / "partition.npz"
    err = split(run_cli, sources["qwen2"], tmp_path / "out", "-n", 4, "-k", 1, "--strategy", "clustering",
                "--cluster-on", "gate+up", "--save-partition", path)
    with np.load(path) as archive:
        sizes = [len(archive[f"layer{layer}_expert{j}"]) for layer in (0, 1) for j in range(4)]
    assert sizes == [11] * 8
    assert "within-cluster cosine spread" in " ".join(err.split())


def test_sharing_inner_covers_every_neuron_with_experts_of_at_least_a_quarter(tmp_path, run_cli, sources, calibration):
    for layer in saved_partition(tmp_path, run_cli, sources["llama"], calibration, "sharing-inner").values():
        assert sorted(set(sum(layer["experts"], []))) == list(range(FFN)) and layer["shared"] == []
        assert all(len(e) >= FFN // 4 and len(set(e)) == len(e) for e in layer["experts"])


def test_a_saved_partition_reproduces_the_split(tmp_path, run_cli, sources, calibration):
    for suffix in (".json", ".npz"):
        split(run_cli, sources["llama"], tmp_path / f"a{suffix}", "-n", 4, "-k", 2, "--strategy", "coactivation",
              "--calibration", calibration, "--router-init", "centroid", "--save-partition", tmp_path / f"p{suffix}")
        split(run_cli, sources["llama"], tmp_path / f"b{suffix}", "-n", 4, "-k", 2, "--partition", tmp_path / f"p{suffix}",
              "--router-init", "centroid")
        first, second = read_tensors(tmp_path / f"a{suffix}"), read_tensors(tmp_path / f"b{suffix}")
        assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)


# ------------------------------------------------------------------ determinism and routers
@pytest.mark.parametrize("strategy, router", [("clustering", "calibrated"), ("sharing-inter", "normal")])
def test_same_seed_gives_byte_identical_output(tmp_path, run_cli, sources, calibration, strategy, router):
    for name in ("a", "b"):
        split(run_cli, sources["llama"], tmp_path / name, "-n", 4, "-k", 2, "--strategy", strategy, "--router-init",
              router, "--calibration", calibration, "--seed", 7, "--max-shard-size", "40KB")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_another_seed_gives_another_random_split(tmp_path, run_cli, sources):
    for seed in (0, 1):
        split(run_cli, sources["llama"], tmp_path / f"s{seed}", "-n", 4, "-k", 2, "--strategy", "random", "--seed", seed,
              "--save-partition", tmp_path / f"p{seed}.json")
    assert (tmp_path / "p0.json").read_text() != (tmp_path / "p1.json").read_text()


@pytest.mark.parametrize("router", ["normal", "centroid", "calibrated"])
def test_top_k_below_n_writes_a_working_moe_with_the_chosen_router(tmp_path, run_cli, sources, calibration, router):
    err = split(run_cli, sources["llama"], tmp_path / "out", "-n", 4, "-k", 2, "--strategy", "random",
                "--router-init", router, "--calibration", calibration)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 2
    rows = Checkpoint.open(tmp_path / "out").read("model.layers.0.block_sparse_moe.gate.weight")
    assert rows.shape == (4, 32) and rows.abs().sum() > 0
    assert torch.isfinite(logits(load_model(tmp_path / "out"), sample_ids())).all()
    if router == "calibrated":
        assert "calibrated router picks" in " ".join(err.split())


def test_expert_scale_is_folded_into_down_proj(tmp_path, run_cli, sources):
    for scale in ("auto", "K", "2.5"):
        split(run_cli, sources["llama"], tmp_path / scale, "-n", 4, "-k", 2, "--strategy", "random",
              "--expert-scale", scale, "--save-partition", tmp_path / "p.json", "--force")
    expert0 = json.loads((tmp_path / "p.json").read_text())["layers"]["0"]["experts"][0]
    down = Checkpoint.open(sources["llama"]).read("model.layers.0.mlp.down_proj.weight")[:, expert0]
    for scale, factor in (("auto", 8 ** 0.5), ("K", 2.0), ("2.5", 2.5)):  # auto = sqrt(K * N)
        written = Checkpoint.open(tmp_path / scale).read("model.layers.0.block_sparse_moe.experts.0.w2.weight")
        assert torch.allclose(written, down * factor, atol=1e-6)


# ------------------------------------------------------------------ calibration text
def save_tokenizer(directory, text):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(text.split()))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{word: 3 + i for i, word in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def test_calibration_text_is_tokenised_with_the_models_tokenizer(tmp_path, run_cli):
    text = " ".join(f"w{i % 60}" for i in range(900))
    source = save_model(tmp_path / "src", "llama")
    save_tokenizer(source, text)
    (tmp_path / "text.txt").write_text(text)
    err = split(run_cli, source, tmp_path / "out", "-n", 4, "-k", 4, "--strategy", "sharing-inter",
                "--calibration", tmp_path / "text.txt", "--calibration-tokens", 600)
    assert "600 calibration tokens" in " ".join(err.split())
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert max_difference(source, tmp_path / "out") <= EXACT


# ------------------------------------------------------------------ refusals
def refused(run_cli, tmp_path, *args):
    code, _, err = run_cli("split", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("surgery: error: ")
    assert not (tmp_path / "out").exists()
    return " ".join(err.split())


@pytest.mark.parametrize("args, message", [
    (["-n", 1, "-k", 1, "--strategy", "random"], "at least 2 experts"),
    (["-n", 4, "-k", 5, "--strategy", "random"], "--top-k 5: must be between 1 and --num-experts (4)"),
    (["-n", 45, "-k", 2, "--strategy", "random"], "more experts than the FFN has neurons"),
    (["-n", 4, "-k", 2, "--strategy", "kmeans"], "--strategy 'kmeans' is not a split strategy"),
    (["-n", 4, "-k", 2, "--strategy", "random", "--router-init", "hash"], "--router-init 'hash'"),
    (["-n", 4, "-k", 2], "--strategy is required"),
    (["-n", 4, "-k", 2, "--strategy", "random", "--shared-neurons", 41], "expected 0 to 40 shared neurons"),
    (["-n", 4, "-k", 2, "--strategy", "random", "--shared-neurons", 4, "--shared-fraction", 0.1], "give one"),
    (["-n", 4, "-k", 2, "--strategy", "random", "--expert-scale", "-1"], "--expert-scale '-1'"),
    (["-n", 4, "-k", 2, "--strategy", "random", "--format", "qwen3_moe"], "a llama model cannot become qwen3_moe"),
])
def test_bad_options_are_refused_before_writing(tmp_path, run_cli, sources, args, message):
    assert message in refused(run_cli, tmp_path, sources["llama"], tmp_path / "out", *args)


@pytest.mark.parametrize("content, message", [(b"  \n", "text file is empty"), (b"\x00\x01binary", "not a text file")])
def test_unusable_calibration_text_is_refused(tmp_path, run_cli, sources, content, message):
    (tmp_path / "calibration.txt").write_bytes(content)
    for strategy in ("sharing-inner", "coactivation"):
        assert message in refused(run_cli, tmp_path, sources["llama"], tmp_path / "out", "-n", 4, "-k", 2,
                                  "--strategy", strategy, "--calibration", tmp_path / "calibration.txt")


def test_calibration_text_without_a_tokenizer_is_refused(tmp_path, run_cli, sources):
    (tmp_path / "calibration.txt").write_text("some text")
    assert "no tokenizer files" in refused(run_cli, tmp_path, sources["llama"], tmp_path / "out", "-n", 4, "-k", 2,
                                           "--strategy", "random", "--router-init", "calibrated",
                                           "--calibration", tmp_path / "calibration.txt")


def test_a_partition_file_for_another_model_or_expert_count_is_refused(tmp_path, run_cli, sources):
    other = save_model(tmp_path / "wide", "llama", intermediate_size=48)
    split(run_cli, sources["llama"], tmp_path / "first", "-n", 4, "-k", 2, "--strategy", "random",
          "--save-partition", tmp_path / "p.json")
    message = refused(run_cli, tmp_path, sources["llama"], tmp_path / "out", "-n", 2, "-k", 2, "--partition", tmp_path / "p.json")
    assert "holds 4 experts, --num-experts is 2" in message
    message = refused(run_cli, tmp_path, other, tmp_path / "out", "-n", 4, "-k", 2, "--partition", tmp_path / "p.json")
    assert "made for intermediate_size 44, the model has 48" in message


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, run_cli, sources):
    code, out, err = run_cli("split", sources["llama"], tmp_path / "out", "-n", 4, "-k", 2, "--strategy", "random",
                             "--dry-run", "--json")
    plan = json.loads(out)
    assert code == 0 and not (tmp_path / "out").exists()
    recipes = {t["name"]: t["recipe"] for t in plan["tensors"]}
    assert recipes["model.layers.0.block_sparse_moe.experts.0.w1.weight"].startswith("rows[")
    assert recipes["model.layers.0.block_sparse_moe.experts.0.w2.weight"].startswith(f"{8 ** 0.5:g} * cols[")  # auto scale
    assert recipes["model.layers.0.block_sparse_moe.gate.weight"] == "centroid router rows"  # auto, no tokenizer


# ------------------------------------------------------------------ --verify
def test_verify_confirms_exactness_when_k_equals_n(tmp_path, run_cli, sources):
    code, out, err = run_cli("split", sources["qwen2"], tmp_path / "out", "-n", 4, "-k", 4, "--strategy", "shared-norm",
                             "--verify")
    text = " ".join((out + err).split())
    assert code == 0 and "verify: passed: largest relative difference" in text and "head" in text


def test_verify_reports_the_loss_change_when_the_split_is_not_exact(tmp_path, run_cli, sources):
    for name, args in (("k1", ["-k", 1]), ("centroid", ["-k", 4, "--router-init", "centroid"])):
        code, out, err = run_cli("split", sources["llama"], tmp_path / name, "-n", 4, *args, "--strategy", "random",
                                 "--verify")
        text = " ".join((out + err).split())
        assert code == 0 and "verify: loss" in text and f"vs {sources['llama']}" in text and "verify: passed" not in text


# ------------------------------------------------------------------ default router
def test_default_router_is_zero_at_k_equals_n_and_the_split_is_exact(tmp_path, run_cli, sources):
    split(run_cli, sources["llama"], tmp_path / "out", "-n", 4, "-k", 4, "--strategy", "random")
    meta = Checkpoint.open(tmp_path / "out").metadata
    options = json.loads(next(iter(meta.values()))["surgery_options"])
    assert options["router_init"] == "zero" and max_difference(sources["llama"], tmp_path / "out") <= EXACT


def test_default_router_below_k_equals_n_is_calibrated_on_the_given_tokens(tmp_path, run_cli, sources, calibration):
    err = split(run_cli, sources["llama"], tmp_path / "out", "-n", 4, "-k", 2, "--strategy", "random",
                "--calibration", calibration)
    assert f"router: calibrated on {calibration} (--router-init auto at top-2 of 4" in " ".join(err.split())


def test_default_router_without_tokenizer_or_calibration_is_the_centroid_router_and_says_why(tmp_path, run_cli,
                                                                                              sources):
    err = " ".join(split(run_cli, sources["llama"], tmp_path / "out", "-n", 4, "-k", 2, "--strategy", "random").split())
    assert "router: centroid (--router-init auto at top-2 of 4: llama has no tokenizer" in err
    router = Checkpoint.open(tmp_path / "out").read("model.layers.0.block_sparse_moe.gate.weight")
    assert torch.count_nonzero(router) == router.numel()


def test_with_defaults_only_a_split_of_the_demo_model_uses_every_expert_in_every_layer(tmp_path, run_cli):
    """The default router at top-2 of 8 (calibrated on the shipped sample) leaves no expert unused."""
    from conftest import DEMO_MODEL

    from surgery.checks.validation import validate

    split(run_cli, DEMO_MODEL, tmp_path / "out", "-n", 8, "-k", 2, "--strategy", "random")
    routing = validate(tmp_path / "out", device="cpu", max_tokens=2048)["routing"]
    assert len(routing) == 4 and all(layer["unused_experts"] == [] for layer in routing)


# ------------------------------------------------------------------ notes say what happened
def note_lines(err):
    return [line for line in " ".join(err.split()).split("note: ")[1:]]


def test_an_even_qwen2_split_mentions_no_padding_only_the_inert_shared_expert(tmp_path, run_cli, sources):
    err = split(run_cli, sources["qwen2"], tmp_path / "out", "-n", 4, "-k", 4, "--strategy", "random")
    text = " ".join(err.split())
    assert "padded" not in text and "writing an inert all-zero one (8 neurons, gate 0" in text
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["moe_intermediate_size"] * 4 == FFN and config["shared_expert_intermediate_size"] == 8


def test_the_active_share_note_is_the_share_of_neurons_the_written_experts_hold(tmp_path, run_cli, sources):
    err = split(run_cli, sources["llama"], tmp_path / "out", "-n", 4, "-k", 1, "--strategy", "shared-norm",
                "--router-init", "normal")
    text = " ".join(err.split())
    import re

    claimed = int(re.search(r"top-1 of 4: each token uses about (\d+)% of the FFN neurons", text).group(1))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    # shared-norm duplicates its shared neurons into every Mixtral expert: one expert holds shared + routed
    held = config["intermediate_size"] / FFN
    assert abs(claimed / 100 - held) <= 0.01


def test_the_shared_neurons_note_counts_the_shared_expert_written(tmp_path, run_cli, sources):
    err = " ".join(split(run_cli, sources["qwen2"], tmp_path / "out", "-n", 4, "-k", 2, "--strategy", "shared-norm",
                         "--router-init", "normal").split())
    import re

    count = int(re.search(r"(\d+) shared neurons per layer, a qwen2_moe shared expert", err).group(1))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == count > 0


def test_the_overlap_note_is_the_largest_number_of_neurons_several_experts_hold(tmp_path, run_cli, sources,
                                                                               calibration):
    import re

    path = tmp_path / "p.json"
    err = " ".join(split(run_cli, sources["llama"], tmp_path / "out", "-n", 4, "-k", 2, "--strategy", "sharing-inner",
                         "--calibration", calibration, "--save-partition", path).split())
    claimed = int(re.search(r"experts overlap: up to (\d+) neurons per layer held by several experts", err).group(1))
    layers = json.loads(path.read_text())["layers"].values()
    counts = [np.bincount(np.concatenate([np.asarray(e) for e in layer["experts"]]), minlength=FFN) for layer in layers]
    assert claimed == max(int((c > 1).sum()) for c in counts) > 0


def test_the_k_equals_n_notes_say_exact_only_when_verify_confirms_it(tmp_path, run_cli, sources):
    code, out, err = run_cli("split", sources["llama"], tmp_path / "zero", "-n", 4, "-k", 4, "--strategy", "random",
                             "--verify")
    text = " ".join((out + err).split())
    assert code == 0 and "k = N with a zero router and expert scale N" in text and "verify: passed" in text
    code, out, err = run_cli("split", sources["llama"], tmp_path / "normal", "-n", 4, "-k", 4, "--strategy", "random",
                             "--router-init", "normal", "--verify")
    text = " ".join((out + err).split())
    assert code == 0 and "k = N, but with a normal router" in text and "verify: passed" not in text
    code, _, _ = run_cli("validate", tmp_path / "normal", "-r", sources["llama"], "--expect-exact")
    assert code == 2  # what the note says: not exact
