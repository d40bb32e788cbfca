"""A full pass that reads an MoE layer's experts one at a time gives what the plain pass gives, bit for bit,
and holds one expert at a time: a layer bigger than the memory budget still runs."""

import contextlib

import pytest
import torch
from test_execution import assert_same_on_real_tokens, batches, runner_logits, whole_logits
from tiny_models import build_model, save_model

from surgery.errors import SurgeryError
from surgery.execution.batches import batches as make_batches
from surgery.execution.hidden import HiddenStore
from surgery.execution.placement import Placement
from surgery.execution.probes import Probe
from surgery.execution.runner import LayerRunner
from surgery.execution.settings import MemoryBudget
from surgery.execution.step import Collect, router_input_probe
from surgery.execution.weights import ModelWeights
from surgery.io.checkpoint import Checkpoint

MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "granitemoe", "granitemoeshared", "flex_olmo", "deepseek_v3",
                "deepseek_v2", "glm4_moe", "minimax_m2", "ernie4_5_moe", "olmoe", "phimoe", "qwen3_next",
                "qwen3_5_moe_text", "gpt_oss"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("expert-stream")
    built = {}

    def get(family):
        if family not in built:
            built[family] = save_model(root / family, family, seed=5)
        return built[family]
    return get


def layer_outputs(directory, streamed: bool, dtype="float32", fit_pass=False, probes=(), spill_dir=None):
    """Every layer's output (and, with `fit_pass`, after a router-fit-like pass stopped at the router input,
    whose attention output the full pass replays), with the experts read one at a time or all together, and
    the hidden states in memory or (`spill_dir`) spilled."""
    with Checkpoint.open(directory) as checkpoint:
        weights = ModelWeights.from_checkpoint(checkpoint)
        runner = LayerRunner(weights, batches(), Placement.resolve("cpu", dtype), MemoryBudget.parse(None),
                             reuse_attention=fit_pass)
        runner.stream_experts = streamed
        if spill_dir is not None:
            runner.spill_dir = spill_dir
        reads, load_expert = [], runner.load_expert
        runner.load_expert = lambda *args: (reads.append(args[-1]), load_expert(*args))[1]
        hidden, outputs = runner.embed(), []
        for layer in range(runner.num_layers):
            with runner.layer(layer) as session:
                if fit_pass:
                    session.run(hidden, [router_input_probe(weights.family, Collect())],
                                stop_after=weights.family.router_input)
                hidden = session.run(hidden, probes)
            outputs.append([hidden.get(index, dtype=hidden.get(index).dtype) for index in range(len(batches()))])
        assert bool(reads) == streamed  # the streamed path really ran (or really did not)
        return outputs


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_pass_reading_experts_one_at_a_time_equals_the_plain_pass_bit_for_bit(saved, family):
    plain, streamed = layer_outputs(saved(family), False), layer_outputs(saved(family), True)
    for mine, theirs in zip(streamed, plain):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_llama4s_streamed_pass_equals_the_plain_pass_within_rounding(tmp_path, top_k):
    """Llama 4's block runs every expert on every token (zeros where a token did not choose it) and sums their
    outputs in torch's reduction order; the streamed pass runs each expert on its own tokens and adds them in
    expert order: the same within float32 rounding (the matmuls see fewer rows)."""
    directory = save_model(tmp_path / "llama4", "llama4_text", seed=5, num_experts_per_tok=top_k)
    plain, streamed = layer_outputs(directory, False), layer_outputs(directory, True)
    for mine, theirs in zip(streamed, plain):
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_streamed_pass_replaying_a_kept_attention_output_equals_the_plain_pass(saved, dtype):
    plain = layer_outputs(saved("mixtral"), False, dtype, fit_pass=True)
    streamed = layer_outputs(saved("mixtral"), True, dtype, fit_pass=True)
    for mine, theirs in zip(streamed, plain):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


@pytest.mark.parametrize("fit_pass", [False, True])
def test_a_streamed_pass_with_spilled_hidden_states_equals_the_plain_pass(saved, tmp_path, fit_pass):
    plain = layer_outputs(saved("mixtral"), False, fit_pass=fit_pass)
    streamed = layer_outputs(saved("mixtral"), True, fit_pass=fit_pass, spill_dir=tmp_path)
    for mine, theirs in zip(streamed, plain):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert list(tmp_path.iterdir()) == []  # every spill file removed


def test_a_streamed_pass_reads_spilled_hidden_states_a_row_chunk_at_a_time(saved, tmp_path, monkeypatch):
    length = batches()[0].input_ids.shape[1]
    monkeypatch.setattr("surgery.execution.layer_session.CALL_TOKENS", length)  # one sequence per layer call
    reads = []
    get = HiddenStore.get

    def spy(self, batch, *args, **kwargs):
        value = get(self, batch, *args, **kwargs)
        reads.append((self._path.name.split("-")[1], value.shape[0]))
        return value

    monkeypatch.setattr(HiddenStore, "get", spy)
    layer_outputs(saved("mixtral"), True, fit_pass=True, spill_dir=tmp_path)
    sequences = len(batches()[0].input_ids)
    assert sequences > 1
    assert {rows for label, rows in reads if label == "attention"} == {1}  # [sequences, length, hidden]: one
    assert {rows for label, rows in reads if label == "experts"} == {length}  # [tokens, hidden]: one sequence's


@pytest.mark.parametrize("fit_pass", [False, True])
def test_the_experts_run_without_the_attention_weights_in_memory(saved, fit_pass, monkeypatch):
    attention_in_memory = []
    load_expert = LayerRunner.load_expert

    def spy(self, layer, layout, expert):
        session_module = self._open_sessions[-1]._module
        attention = session_module.get_submodule("self_attn")
        attention_in_memory.append(any(not parameter.is_meta for parameter in attention.parameters()))
        return load_expert(self, layer, layout, expert)

    monkeypatch.setattr(LayerRunner, "load_expert", spy)
    layer = LayerRunner.layer

    @contextlib.contextmanager
    def opened(self, index):
        with layer(self, index) as session:
            self._open_sessions = [session]
            yield session

    monkeypatch.setattr(LayerRunner, "layer", opened)
    plain = layer_outputs(saved("mixtral"), False, fit_pass=fit_pass)
    streamed = layer_outputs(saved("mixtral"), True, fit_pass=fit_pass)
    assert attention_in_memory and not any(attention_in_memory)
    for mine, theirs in zip(streamed, plain):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


def test_probes_see_the_same_rows_in_a_streamed_pass(saved):
    def seen(streamed):
        rows = {}
        probes = [Probe(module, where, lambda batch, value, key=(module, where): rows.setdefault(key, []).append(value))
                  for module, where in (("mlp.gate", "output"), ("mlp", "output"), ("", "output"))]
        layer_outputs(saved("mixtral"), streamed, probes=probes)
        return rows

    plain, streamed = seen(False), seen(True)
    assert plain.keys() == streamed.keys() and len(plain) == 3
    for key in plain:
        assert len(plain[key]) == len(streamed[key])  # each batch once per layer: the router runs twice, seen once
        assert all(torch.equal(a, b) for a, b in zip(plain[key], streamed[key]))


def test_a_streamed_pass_reads_each_expert_alone_and_in_order(saved, monkeypatch):
    layers, experts = [], []
    whole, one = ModelWeights.materialize, ModelWeights.materialize_expert
    monkeypatch.setattr(ModelWeights, "materialize", lambda self, tensors, *a: (
        layers.extend(t.name for t in tensors), whole(self, tensors, *a))[1])
    monkeypatch.setattr(ModelWeights, "materialize_expert", lambda self, tensors, expert, *a: (
        experts.append(expert), one(self, tensors, expert, *a))[1])
    layer_outputs(saved("mixtral"), True)
    assert layers and not any(".experts." in name for name in layers)
    count = build_model("mixtral").config.num_local_experts
    assert experts == list(range(count)) * build_model("mixtral").config.num_hidden_layers


def test_experts_stored_fused_are_read_one_expert_row_at_a_time(tmp_path):
    model = build_model("mixtral", seed=2)
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    model.save_pretrained(tmp_path / "per-expert")
    plain, streamed = layer_outputs(tmp_path / "per-expert", False), layer_outputs(tmp_path / "fused", True)
    for mine, theirs in zip(streamed, plain):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


def streamed_budget(weights) -> MemoryBudget:
    """The smallest budget that runs the model: the embedding or the head, or one layer's weights but its
    experts and one expert, whichever is larger (the hidden states spilled)."""
    top = max(weights.nbytes(weights.top_tensors(role), 4) for role in ("embed", "lm_head"))
    runner = LayerRunner(weights, batches(), Placement.resolve("cpu"), MemoryBudget.parse(None))
    layer = max(layout.other_bytes + layout.expert_bytes for layout in runner.expert_layouts.values())
    return MemoryBudget(max(layer, top), "--memory-budget (test)")


def test_a_layer_larger_than_the_budget_runs_with_its_experts_read_one_at_a_time(tmp_path, capsys):
    directory = save_model(tmp_path / "wide", "mixtral", seed=1, intermediate_size=256, vocab_size=96)
    with Checkpoint.open(directory) as checkpoint:
        weights = ModelWeights.from_checkpoint(checkpoint)
        budget = streamed_budget(weights)
        assert budget.limit < weights.largest_layer_bytes(4)[1]
        assert_same_on_real_tokens(runner_logits(weights, budget, tmp_path), whole_logits(directory))
    assert "its experts are read one at a time" in capsys.readouterr().err


def test_a_budget_smaller_than_one_expert_beside_the_rest_of_a_layer_is_refused(tmp_path):
    directory = save_model(tmp_path / "wide", "mixtral", seed=1, intermediate_size=256, vocab_size=96)
    with Checkpoint.open(directory) as checkpoint:
        weights = ModelWeights.from_checkpoint(checkpoint)
        budget = MemoryBudget(streamed_budget(weights).limit - 1, "--memory-budget (test)")
        with pytest.raises(SurgeryError, match=r"too small to run one layer of .*: layer \d+ needs .* \(.* with its "
                                               r"experts read one at a time\) in float32"):
            LayerRunner(weights, batches(), Placement.resolve("cpu"), budget)


def test_experts_that_cannot_be_read_one_at_a_time_count_whole_against_the_budget(tmp_path, monkeypatch):
    """An experts module whose calling convention the stream does not know (here: one made so) counts whole: a
    budget below its layer is refused up front, naming why, never exceeded while a note says experts are
    streamed."""
    from surgery.execution import runner as runner_module

    monkeypatch.setattr(runner_module, "streamable", lambda *args: False)
    directory = save_model(tmp_path / "mixtral", "mixtral", seed=1)
    with Checkpoint.open(directory) as checkpoint:
        weights = ModelWeights.from_checkpoint(checkpoint)
        layer, size = weights.largest_layer_bytes(4)
        budget = MemoryBudget(size - 1, "--memory-budget (test)")
        with pytest.raises(SurgeryError, match=rf"layer {layer} needs .* \(its experts are read together: "
                                               r"\w+'s experts module cannot run one expert on its own tokens\)"):
            LayerRunner(weights, batches(), Placement.resolve("cpu"), budget)
        assert not LayerRunner(weights, batches(), Placement.resolve("cpu"), MemoryBudget(size * 8, "(test)")
                               ).stream_experts


def test_the_runner_reads_experts_one_at_a_time_only_where_that_takes_less_memory(saved):
    with Checkpoint.open(saved("mixtral")) as checkpoint:
        weights = ModelWeights.from_checkpoint(checkpoint)
        many = list(make_batches([list(range(3, 15))] * 64, 8, 12, 0))  # hidden states larger than 3 experts
        few = list(make_batches([list(range(3, 15))], 8, 12, 0))
        assert not LayerRunner(weights, many, Placement.resolve("cpu"), MemoryBudget.parse(None)).stream_experts
        assert LayerRunner(weights, few, Placement.resolve("cpu"), MemoryBudget.parse(None)).stream_experts
