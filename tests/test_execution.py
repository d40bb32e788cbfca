"""Layer-by-layer execution: the same numbers as transformers' whole model, in bounded memory.

Every reference here is computed by transformers itself (the whole model, forward hooks and
autograd) on the same batches; the layer-by-layer runner must match it to float noise (1e-5) and
is in practice bit-identical in float32.
"""

import contextlib
import json

import numpy as np
import pytest
import torch
from tiny_models import load_model, router_inputs_by_hooks, save_model

from surgery.execution.batches import batches as make_batches
from surgery.execution.calibration import CalibrationSet
from surgery.execution.hidden import HiddenStore
from surgery.execution.layer_pass import LayerPass
from surgery.execution.placement import Placement
from surgery.execution.runner import LayerRunner
from surgery.execution.settings import MemoryBudget
from surgery.execution.step import Step
from surgery.execution.weights import ModelWeights
from surgery.io.checkpoint import Checkpoint

ROWS = [list(range(3, 15)), list(range(20, 27)), [5, 80, 81, 7], list(range(40, 52))]  # padding in two rows
FAMILIES = [("llama", {}), ("mistral", {}), ("qwen2", {}), ("qwen3", {}), ("mixtral", {}), ("qwen2_moe", {}),
            ("qwen3_moe", {}), ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1))]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("execution")
    built = {}

    def get(family, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in built:
            built[key] = save_model(root / f"{family}-{len(built)}", family, seed=3, **overrides)
        return built[key]
    return get


def batches():
    return list(make_batches(ROWS, 3, 12, 0))


def whole_logits(directory):
    model = load_model(directory)
    with torch.no_grad():
        return [model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits for b in batches()]


def runner_logits(weights, budget=None, spill_dir=None):
    layer_pass = LayerPass(weights, batches(), Placement.resolve("cpu"), budget or MemoryBudget.parse(None), spill_dir)
    hidden = layer_pass.forward()
    out = {}
    layer_pass.head(hidden, lambda index, part, logits, extra: out.setdefault(index, []).append(logits))
    return [torch.cat(out[index]) for index in sorted(out)]


def assert_same_on_real_tokens(got, expected, tolerance=1e-5):
    for batch, mine, theirs in zip(batches(), got, expected):
        real = batch.attention_mask.bool()
        assert (mine - theirs)[real].abs().max().item() <= tolerance


# ------------------------------------------------------------------ the runner
@pytest.mark.parametrize("family,overrides", FAMILIES, ids=lambda v: v if isinstance(v, str) else "")
def test_layer_by_layer_logits_equal_the_whole_model(models, family, overrides):
    directory = models(family, **overrides)
    with Checkpoint.open(directory) as checkpoint:
        got = runner_logits(ModelWeights.from_checkpoint(checkpoint))
    assert_same_on_real_tokens(got, whole_logits(directory), tolerance=0.0)


def test_the_head_can_stop_at_the_final_norm(models):
    """norm_only: the last hidden state the model returns (after the final norm), no logits, no head read."""
    directory = models("llama")
    model = load_model(directory)
    with Checkpoint.open(directory) as checkpoint:
        layer_pass = LayerPass(ModelWeights.from_checkpoint(checkpoint), batches(), Placement.resolve("cpu"),
                               MemoryBudget.parse(None))
        hidden = layer_pass.forward()
        seen = {}
        layer_pass.head(hidden, lambda index, part, logits, extra: seen.setdefault(index, (logits, extra["norm"])),
                    norm_only=True)
    for index, batch in enumerate(batches()):
        with torch.no_grad():
            expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             output_hidden_states=True).hidden_states[-1]
        logits, norm = seen[index]
        assert logits is None
        assert (norm - expected)[batch.attention_mask.bool()].abs().max().item() <= 1e-6


def test_hidden_states_spilled_to_a_file_give_the_same_logits_and_leave_no_file(models, tmp_path):
    directory = models("mixtral")
    with Checkpoint.open(directory) as checkpoint:
        weights = ModelWeights.from_checkpoint(checkpoint)
        layer_bytes = weights.largest_layer_bytes(4)[1]
        embed_bytes = weights.nbytes(weights.top_tensors("embed"), 4)
        budget = MemoryBudget(max(layer_bytes, embed_bytes) + 1, "--memory-budget (test)")  # no room for hidden states
        runner = LayerRunner(weights, batches(), Placement.resolve("cpu"), budget, tmp_path)
        assert runner.spill_dir == tmp_path
        got = runner_logits(weights, budget, tmp_path)
    assert_same_on_real_tokens(got, whole_logits(directory), tolerance=0.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spilled", [False, True], ids=["in memory", "spilled"])
def test_hidden_states_keep_a_16_bit_dtype_at_half_the_bytes_and_float32_otherwise(tmp_path, spilled):
    store = HiddenStore(tmp_path if spilled else None)
    halves = torch.randn(3, 5, 8).to(torch.bfloat16)
    store.put(0, halves)
    store.put(1, torch.randn(3, 5, 8, dtype=torch.float64))
    assert store.nbytes == 3 * 5 * 8 * (2 + 4)
    assert torch.equal(store.get(0, dtype=torch.bfloat16), halves)
    assert store.get(0).dtype == store.get(1).dtype == torch.float32
    if spilled:
        assert [path.stat().st_size for path in tmp_path.iterdir()] == [store.nbytes]
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_a_bfloat16_run_gives_the_same_logits_with_its_hidden_states_spilled(models, tmp_path):
    directory = models("mixtral")
    placement = Placement.resolve("cpu", "bfloat16")
    got = {}
    with Checkpoint.open(directory) as checkpoint:
        weights = ModelWeights.from_checkpoint(checkpoint)
        roomy = MemoryBudget.parse(None)
        tight = MemoryBudget(max(weights.largest_layer_bytes(2)[1], weights.nbytes(weights.top_tensors("embed"), 2))
                             + 1, "--memory-budget (test)")
        for name, budget in (("memory", roomy), ("file", tight)):
            layer_pass = LayerPass(weights, batches(), placement, budget, tmp_path)
            assert (layer_pass.runner().spill_dir is not None) == (name == "file")
            hidden = layer_pass.forward()
            assert hidden.nbytes == sum(b.input_ids.numel() for b in batches()) * weights.config["hidden_size"] * 2
            got[name] = []
            layer_pass.head(hidden, lambda index, part, logits, extra: got[name].append(logits))
            hidden.close()
    assert all(torch.equal(a, b) for a, b in zip(got["memory"], got["file"]))
    assert list(tmp_path.iterdir()) == []


def test_a_budget_smaller_than_one_layer_is_refused_before_anything_runs(models):
    from surgery.errors import SurgeryError

    with Checkpoint.open(models("llama")) as checkpoint:
        weights = ModelWeights.from_checkpoint(checkpoint)
        with pytest.raises(SurgeryError, match=r"--memory-budget 1KB is too small to run one layer of .*: layer \d+ "
                                               r"needs [0-9.]+ KB in float32"):
            LayerRunner(weights, batches(), Placement.resolve("cpu"), MemoryBudget.parse("1KB"))


def test_a_plan_runs_as_the_checkpoint_it_will_write(models, tmp_path):
    """An upcycle plan run from its recipes (nothing written) gives the written model's logits."""
    from surgery.upcycle import build_plan
    from surgery.writer.stream import write_plan

    plan = build_plan(models("llama"), 4, 2, granularity=2, router_init="normal")
    planned = runner_logits(ModelWeights.from_plan(plan))
    write_plan(plan, tmp_path / "moe")
    assert_same_on_real_tokens(planned, whole_logits(tmp_path / "moe"), tolerance=0.0)


# ------------------------------------------------------------------ calibration set
def random_rows(seed, count, length):
    generator = np.random.default_rng(seed)
    return [generator.integers(3, 96, length).tolist() for _ in range(count)]


def calibration_of(tmp_path, rows, name="ids.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_token_rows_are_cut_batched_and_padded_like_validation(tmp_path):
    config = {"vocab_size": 96, "max_position_embeddings": 16}
    calibration = CalibrationSet.load(calibration_of(tmp_path, [list(range(3, 40))]), tmp_path, config, 30)
    assert calibration.tokens == 30 and [b.input_ids.shape[1] for b in calibration.batches] == [16]
    assert calibration.batches[0].attention_mask.sum(1).tolist() == [16, 14]


@pytest.mark.parametrize("rows,message", [
    ([[3, 4, 200]], "token id 200 is out of range for a vocabulary of 96"),
    ([[0, 0, 0], [0, 0]], "holds only the padding token (id 0)"),
    ([[7]], "gives 1 token(s); at least 2 are needed"),
])
def test_unusable_token_files_are_refused(tmp_path, rows, message):
    from surgery.errors import SurgeryError

    with pytest.raises(SurgeryError, match=re_escape(message)):
        CalibrationSet.load(calibration_of(tmp_path, rows), tmp_path, {"vocab_size": 96}, 100)


def re_escape(text):
    import re

    return re.escape(text)


# ------------------------------------------------------------------ statistics against the whole model
def test_upcycle_calibrated_routers_are_kmeans_of_the_whole_models_router_inputs(models, tmp_path, run_cli):
    from surgery.execution.routers.registry import make
    from surgery.execution.routers.request import RouterRequest
    from surgery.seeds import sklearn_state

    source = models("qwen3")
    ids = calibration_of(tmp_path, random_rows(0, 6, 60))
    code, _, err = run_cli("upcycle", source, tmp_path / "out", "-n", 4, "-k", 2, "--router-init", "calibrated",
                           "--calibration", ids, "--seed", 5)
    assert code == 0, err
    calibration = CalibrationSet.load(ids, source, json.loads((source / "config.json").read_text()), 2048)
    reference = router_inputs_by_hooks(load_model(source), calibration.batches, [0, 1])
    with Checkpoint.open(tmp_path / "out") as written:
        for layer in (0, 1):
            expected = make("kmeans", RouterRequest(4, 32, seed=sklearn_state(5, "kmeans", layer), std=0.02,
                                                    inputs=reference[layer])).rows
            assert torch.allclose(written.read(f"model.layers.{layer}.mlp.gate.weight"), expected, atol=1e-5)


def neuron_values_by_hooks(model, batches, layers, with_grad=False):
    """{layer: [per batch: (h on real tokens, dL/dh on real tokens or None)]} from the whole model."""
    from surgery.execution.neurons import next_token_loss

    seen = {layer: [] for layer in layers}
    handles = []
    for layer in layers:
        def hook(_module, args, layer=layer):
            value = args[0]
            if with_grad:
                value.retain_grad()
            seen[layer].append(value)
        handles.append(model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(hook))
    out = {layer: [] for layer in layers}
    try:
        for batch in batches:
            keep = batch.attention_mask.reshape(-1).bool()
            with torch.set_grad_enabled(with_grad):
                embeds = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(with_grad)
                logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
                if with_grad:
                    next_token_loss(logits, batch).backward()
            for layer in layers:
                value = seen[layer].pop()
                rows = value.detach().reshape(-1, value.shape[-1])[keep]
                grad = value.grad.reshape(-1, value.shape[-1])[keep] if with_grad else None
                out[layer].append((rows, grad))
    finally:
        for handle in handles:
            handle.remove()
    return out


def captured_strategy_inputs(monkeypatch, module_name):
    """Record the LayerInputs each layer's partition receives."""
    import importlib

    module = importlib.import_module(module_name)
    original, seen = module.split, {}

    def split(inputs):
        seen[inputs.layer] = inputs
        return original(inputs)

    monkeypatch.setattr(module, "split", split)
    return seen


def split_options(strategy, calibration_path, **extra):
    from surgery.split import SplitOptions

    return SplitOptions(4, 2, strategy, calibration=str(calibration_path), calibration_tokens=400, device="cpu", **extra)


def run_split_statistics(source, options):
    from surgery.partition.calibrated import partition_layers
    from surgery.partition.plan import load_calibration, shared_count
    from surgery.plan.sources import open_dense_source

    checkpoint, family = open_dense_source(source)
    with checkpoint:
        calibration = load_calibration(checkpoint, options)
        splits = partition_layers(checkpoint, family, options, [0, 1], 44, shared_count(options, 44),
                                  calibration=calibration, settings=options.run)
    return calibration, splits


def test_firing_bits_and_router_targets_equal_the_whole_models(models, tmp_path, monkeypatch):
    from surgery.execution.neurons import FiringBits, membership
    from surgery.execution.routers.registry import make
    from surgery.execution.routers.request import RouterRequest

    source = models("llama")
    ids = calibration_of(tmp_path, random_rows(1, 5, 50))
    seen = captured_strategy_inputs(monkeypatch, "surgery.partition.coactivation")
    calibration, splits = run_split_statistics(source, split_options("coactivation", ids, router_init="calibrated"))
    model = load_model(source)
    values = neuron_values_by_hooks(model, calibration.batches, [0, 1])
    inputs = router_inputs_by_hooks(model, calibration.batches, [0, 1])
    for layer in (0, 1):
        firing = FiringBits()
        for index, (rows, _) in enumerate(values[layer]):
            firing(index, rows)
        assert np.array_equal(seen[layer].firing, firing.bits())
        masses = torch.cat([rows.abs() for rows, _ in values[layer]]) @ torch.as_tensor(
            membership(splits.partitions[layer], 44))
        expected = make("ridge", RouterRequest(4, 32, inputs=inputs[layer], targets=masses)).rows
        assert torch.allclose(torch.as_tensor(splits.routers[layer]), expected, atol=1e-5)


def test_importance_from_the_reverse_pass_equals_autograd_through_the_whole_model(models, tmp_path, monkeypatch):
    from surgery.execution.neurons import token_clusters
    from surgery.seeds import sklearn_state

    source = models("qwen2")
    ids = calibration_of(tmp_path, random_rows(2, 20, 20))
    seen = captured_strategy_inputs(monkeypatch, "surgery.partition.sharing_inner")
    calibration, _ = run_split_statistics(source, split_options("sharing-inner", ids))
    model = load_model(source)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    means = []
    with torch.no_grad():
        for batch in calibration.batches:
            hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            mask = batch.attention_mask.unsqueeze(-1).float()
            means.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).double())
    labels, how = token_clusters(calibration.batches, torch.cat(means).numpy(), 4, sklearn_state(0, "clusters"))
    assert how.startswith("k-means of 20 sequences")
    counts = torch.bincount(torch.cat(labels), minlength=4).double()
    values = neuron_values_by_hooks(model, calibration.batches, [0, 1], with_grad=True)
    for layer in (0, 1):
        sums = torch.zeros(4, 44, dtype=torch.float64)
        for batch_labels, (rows, grads) in zip(labels, values[layer]):
            sums.index_add_(0, batch_labels, (rows * grads).abs().double())
        expected = (sums / counts.clamp(min=1)[:, None]).numpy()
        assert np.allclose(seen[layer].importance, expected, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------ bad input
def bad_run(run_cli, tmp_path, command, source, *args):
    out = tmp_path / "out"
    code, stdout, err = run_cli(command, source, out, "-n", 4, "-k", 2, *args)
    lines = [line for line in err.splitlines() if line.startswith("surgery: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    return lines[0]


@pytest.mark.parametrize("content,message", [
    (b"", "text file is empty"),
    (b"\x00\x01\x02 binary", "not a text file (contains NUL bytes)"),
    (b"[3, 4, 500]\n", "token id 500 is out of range for a vocabulary of 96"),
    (b"[0, 0, 0]\n[0, 0]\n", "calibration data holds only the padding token (id 0)"),
], ids=["empty", "binary", "beyond-vocabulary", "all-padding"])
@pytest.mark.parametrize("command,options", [("upcycle", ["--router-init", "calibrated"]),
                                             ("split", ["--strategy", "coactivation"])])
def test_unusable_calibration_is_a_one_line_error_before_any_output(models, tmp_path, run_cli, content, message,
                                                                     command, options):
    path = tmp_path / ("ids.jsonl" if content.startswith(b"[") else "calibration.txt")
    path.write_bytes(content)
    assert message in bad_run(run_cli, tmp_path, command, models("llama"), *options, "--calibration", path)


@pytest.mark.parametrize("command,options", [("upcycle", ["--router-init", "calibrated"]),
                                             ("split", ["--strategy", "random"])])
def test_a_gpu_asked_for_on_a_machine_without_one_is_refused_before_any_output(models, tmp_path, run_cli, command,
                                                                               options):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    line = bad_run(run_cli, tmp_path, command, models("llama"), *options, "--device", "cuda")
    assert "--device cuda: no CUDA device is available" in line


def test_a_memory_budget_smaller_than_one_layer_is_refused_before_any_output(models, tmp_path, run_cli):
    ids = calibration_of(tmp_path, random_rows(0, 4, 20))
    line = bad_run(run_cli, tmp_path, "upcycle", models("llama"), "--router-init", "calibrated", "--calibration", ids,
                   "--memory-budget", "1KB")
    assert "--memory-budget 1KB is too small to run one layer of" in line and "in float32" in line


@pytest.mark.parametrize("run", ["upcycle calibrated", "merge regmean", "merge regmean++ calibrated"])
def test_a_refused_memory_budget_announces_no_run(models, tmp_path, run_cli, capsys, run):
    """The memory plan comes before the line that says a model is running: a refused run says nothing else."""
    ids, source, other = calibration_of(tmp_path, random_rows(0, 4, 20)), models("llama"), save_model(
        tmp_path / "b", "llama", seed=4)
    capsys.readouterr()  # the models' own saving
    out = tmp_path / "out"
    experts = ["--expert", f"a={source}", "--expert", f"b={other}", "--calibration", f"a={ids}", "--calibration",
               f"b={ids}"]
    args = {"upcycle calibrated": ["upcycle", source, out, "-n", 4, "-k", 2, "--router-init", "calibrated",
                                   "--calibration", ids],
            "merge regmean": ["merge", out, *experts, "--non-ffn", "regmean", "--router-init", "zero"],
            "merge regmean++ calibrated": ["merge", out, *experts]}[run]
    code, _, err = run_cli(*args, "--memory-budget", "1KB")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("surgery: error: --memory-budget 1KB is too small"), err


def test_a_memory_budget_that_is_not_a_size_is_refused(models, tmp_path, run_cli):
    line = bad_run(run_cli, tmp_path, "split", models("llama"), "--strategy", "random", "--memory-budget", "lots")
    assert "--memory-budget 'lots': expected auto or a size such as 4GiB, 800MB" in line


def test_no_calibrating_or_verifying_path_loads_a_whole_model(models, tmp_path, run_cli, monkeypatch):
    """Calibration, statistics and --verify run layer by layer: transformers' whole-model load is never called."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a whole model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    ids = calibration_of(tmp_path, random_rows(4, 12, 30))
    source = models("llama")
    runs = [("upcycle", "-n", 4, "-k", 2, "--router-init", "calibrated", "--calibration", ids, "--verify"),
            ("split", "-n", 4, "-k", 2, "--strategy", "sharing-inter", "--router-init", "calibrated", "--calibration", ids),
            ("split", "-n", 4, "-k", 2, "--strategy", "coactivation", "--calibration", ids),
            ("split", "-n", 4, "-k", 4, "--strategy", "random", "--verify")]
    for number, (command, *args) in enumerate(runs):
        code, _, err = run_cli(command, source, tmp_path / f"out{number}", *args)
        assert code == 0, err


def test_batches_run_in_row_chunks_give_the_same_logits_and_probe_rows(models, monkeypatch):
    """A batch goes through a layer a few rows at a time (bounded activations); masks are cut with the rows,
    and probes still receive each batch's real tokens once, in order."""
    from surgery.execution import layer_session as runner_module
    from surgery.execution.probes import Probe

    directory = models("qwen2_moe")
    with Checkpoint.open(directory) as checkpoint:
        weights = ModelWeights.from_checkpoint(checkpoint)
        whole = LayerPass(weights, batches(), Placement.resolve("cpu"), MemoryBudget.parse(None))
        seen = {"whole": {}, "chunked": {}}

        def run(layer_pass, label):
            class Inputs(Step):  # the input of layer 1's mlp
                def wants(self, layer):
                    return layer == 1

                def probes(self, layer, session):
                    return [Probe("mlp", "input", lambda batch, rows: seen[label].setdefault(batch, []).append(rows))]
            return layer_pass.forward([Inputs()])

        expected = run(whole, "whole")
        monkeypatch.setattr(runner_module, "CALL_TOKENS", 1)  # one row per call
        chunked = LayerPass(weights, batches(), Placement.resolve("cpu"), MemoryBudget.parse(None))
        got = run(chunked, "chunked")
        for index in range(len(batches())):
            assert torch.allclose(got.get(index), expected.get(index), atol=1e-5)
            assert len(seen["chunked"][index]) == 1  # one delivery per batch
            assert torch.allclose(seen["chunked"][index][0], seen["whole"][index][0], atol=1e-5)


def test_collected_rows_come_back_grouped_by_domain_in_batch_order_and_are_let_go():
    from surgery.execution.step import Collect

    calibration = CalibrationSet(batches=[], source="test", domains=[1, 0, 1, 0])
    collect = Collect()
    for batch in (2, 0, 3, 1):  # the order the probes saw them
        collect(batch, torch.full((batch + 1, 2), float(batch)))
    inputs, labels = collect.by_domain(calibration)
    assert inputs[:, 0].tolist() == [1.0] * 2 + [3.0] * 4 + [0.0] * 1 + [2.0] * 3
    assert labels.tolist() == [0] * 6 + [1] * 4
    assert collect.parts == []


def _reads(monkeypatch):
    """The names of the tensors ModelWeights materializes, in order, recorded as the runner asks."""
    names = []
    original = ModelWeights.materialize

    one_expert = ModelWeights.materialize_expert

    def materialize(self, tensors, dtype, device):
        names.extend(tensor.name for tensor in tensors)
        return original(self, tensors, dtype, device)

    def materialize_expert(self, tensors, expert, dtype, device):
        names.extend(f"{tensor.name}[{expert}]" for tensor in tensors)
        return one_expert(self, tensors, expert, dtype, device)
    monkeypatch.setattr(ModelWeights, "materialize", materialize)
    monkeypatch.setattr(ModelWeights, "materialize_expert", materialize_expert)
    return names


@contextlib.contextmanager
def layer_zero(directory, monkeypatch):
    """Layer 0 of the model in `directory`, opened by a fresh runner: (session, its input, family, the names of
    the tensors read from the moment the layer is opened)."""
    with Checkpoint.open(directory) as checkpoint:
        weights = ModelWeights.from_checkpoint(checkpoint)
        runner = LayerRunner(weights, batches(), Placement.resolve("cpu"), MemoryBudget.parse(None))
        hidden = runner.embed()
        names = _reads(monkeypatch)
        with runner.layer(0) as session:
            yield session, hidden, weights.family, names


def test_a_pass_stopped_at_the_router_input_reads_no_weight_of_the_mlp_block(models, monkeypatch):
    """The router fit's pass runs without the MoE block (most of a layer); a full run reads the block then."""
    from surgery.execution.step import Collect, router_input_probe

    with layer_zero(models("mixtral"), monkeypatch) as (session, hidden, family, names):
        session.run(hidden, [router_input_probe(family, Collect())], stop_after=family.router_input)
        stopped = list(names)
        session.run(hidden)
    assert stopped and not any(name.startswith(family.router_input + ".") for name in stopped)
    assert any(name.startswith(family.router_input + ".experts") for name in names[len(stopped):])


def test_a_pass_stopped_inside_the_attention_reads_no_weight_of_the_mlp_block(models, monkeypatch):
    """RegMean's passes stop at o_proj's input: the FFN (most of a dense layer) is never read for them."""
    from surgery.execution.probes import Probe

    seen = []
    with layer_zero(models("llama"), monkeypatch) as (session, hidden, family, names):
        session.run(hidden, [Probe("self_attn.o_proj", "input", lambda batch, rows: seen.append(rows))],
                    outputs=False, stop_after="self_attn.o_proj")
    assert seen and names and not any(name.startswith(family.router_input + ".") for name in names)


def test_a_router_set_before_its_block_is_read_is_the_one_the_layer_runs_with(models):
    with Checkpoint.open(models("mixtral")) as checkpoint:
        weights = ModelWeights.from_checkpoint(checkpoint)
        router = weights.family.router_input + ".gate.weight"
        shape = next(tensor.shape for tensor in weights.layer_tensors(0) if tensor.name == router)
        rows = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        runner = LayerRunner(weights, batches(), Placement.resolve("cpu"), MemoryBudget.parse(None))
        hidden = runner.embed()
        outputs = []
        for read_first in (False, True):
            with runner.layer(0) as session:
                if read_first:
                    session.parameter(router)  # the whole layer is read
                session.set_parameter(router, rows)
                outputs.append(session.run(hidden))
        with runner.layer(0) as session:
            untouched = session.run(hidden)
        for index in range(len(batches())):
            assert torch.equal(outputs[0].get(index), outputs[1].get(index))
            assert not torch.equal(outputs[0].get(index), untouched.get(index))


def test_a_taken_batch_leaves_a_store_held_in_memory():
    store = HiddenStore()
    for batch in (0, 1):
        store.put(batch, torch.full((2, 3), float(batch)))
    assert store.take(0).tolist() == [[0.0] * 3] * 2
    assert store.nbytes == 2 * 3 * 4
    assert store.get(1).tolist() == [[1.0] * 3] * 2


def test_a_spilled_store_still_reads_a_taken_batch_from_its_file(tmp_path):
    store = HiddenStore(tmp_path)
    store.put(0, torch.ones(2, 3))
    assert store.take(0).tolist() == store.get(0).tolist() == [[1.0] * 3] * 2
    store.close()


@pytest.mark.parametrize("spilled", [False, True], ids=["in memory", "spilled"])
def test_a_batch_put_as_row_pieces_reads_back_as_the_joined_batch(tmp_path, spilled):
    store = HiddenStore(tmp_path if spilled else None)
    pieces = [torch.randn(2, 4, 8), torch.randn(1, 4, 8)]
    store.put(0, pieces)
    assert torch.equal(store.get(0), torch.cat(pieces))
    assert store.nbytes == 3 * 4 * 8 * 4
    store.close()


@pytest.mark.parametrize("spilled", [False, True], ids=["in memory", "spilled"])
def test_rows_of_a_batch_are_read_and_written_alone(tmp_path, spilled):
    store = HiddenStore(tmp_path if spilled else None)
    store.zeros(0, (4, 3), torch.float32)
    store.write(0, slice(1, 3), torch.tensor([[1.0, 2, 3], [4, 5, 6]]))
    assert store.get(0).tolist() == [[0.0] * 3, [1.0, 2, 3], [4.0, 5, 6], [0.0] * 3]
    assert store.get(0, rows=slice(2, 4)).tolist() == [[4.0, 5, 6], [0.0] * 3]
    view = store.rows(0)
    assert tuple(view.shape) == (4, 3) and view[1:2].tolist() == [[1.0, 2, 3]]
    store.close()


def test_a_spilled_batch_is_given_to_a_layer_call_as_rows_read_when_sliced(tmp_path, monkeypatch):
    import surgery.execution.hidden as io  # where the store looks up its reads

    store = HiddenStore(tmp_path)
    store.put(0, torch.arange(40.0).reshape(10, 4))
    sizes = []
    pread = io.pread_exact
    monkeypatch.setattr(io, "pread_exact", lambda fd, size, *args: (sizes.append(size), pread(fd, size, *args))[1])
    view = store.rows(0)
    assert sizes == []  # nothing read yet
    assert view[3:5].tolist() == [[12.0, 13, 14, 15], [16.0, 17, 18, 19]]
    assert sizes == [2 * 4 * 4]
    store.close()


def test_released_weights_leave_memory_and_are_read_again_by_the_next_pass_that_needs_them(models):
    with Checkpoint.open(models("mixtral")) as checkpoint:
        weights = ModelWeights.from_checkpoint(checkpoint)
        attention = weights.family.attention_module
        runner = LayerRunner(weights, batches(), Placement.resolve("cpu"), MemoryBudget.parse(None))
        runner.stream_experts = False  # the whole layer is read (expert_stream releases the attention itself)
        hidden = runner.embed()
        with runner.layer(0) as session:
            before = session.run(hidden)
            session.release(attention)
            assert all(p.is_meta for p in session._module.get_submodule(attention).parameters())
            after = session.run(hidden)
            assert not any(p.is_meta for p in session._module.parameters())
        for index in range(len(batches())):
            assert torch.equal(before.get(index), after.get(index))


def test_a_weight_set_by_the_caller_is_never_released(models):
    with Checkpoint.open(models("mixtral")) as checkpoint:
        weights = ModelWeights.from_checkpoint(checkpoint)
        router = weights.family.router_input + ".gate.weight"
        runner = LayerRunner(weights, batches(), Placement.resolve("cpu"), MemoryBudget.parse(None))
        with runner.layer(0) as session:
            rows = torch.randn(session.parameter(router).shape)
            session.set_parameter(router, rows)
            session.release(weights.family.router_input)
            assert torch.equal(session._module.get_parameter(router), rows)
            assert session._module.get_submodule(weights.family.router_input + ".experts").gate_up_proj.is_meta


def test_the_process_memory_bounds_leave_a_setting_the_user_made():
    import os
    import subprocess
    import sys

    code = ("import os; os.environ['LRU_CACHE_CAPACITY'] = '5'\n"
            "from surgery.process_memory import bound_process_memory; bound_process_memory()\n"
            "print(os.environ['LRU_CACHE_CAPACITY'], os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], "
            "os.environ['MKL_DISABLE_FAST_MM'])")
    unset = {name: value for name, value in os.environ.items()
             if name not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "MKL_DISABLE_FAST_MM")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=unset)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["5", "16", "1"]


def test_the_command_line_bounds_process_memory_before_torch_is_imported():
    import subprocess
    import sys

    code = ("import sys, os\n"
            "from surgery.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, os.environ.get('MKL_DISABLE_FAST_MM'), file=sys.stderr)")
    env = {name: value for name, value in __import__("os").environ.items() if name != "MKL_DISABLE_FAST_MM"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.split()[-2:] == ["False", "1"]
