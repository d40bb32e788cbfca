"""The scoring pass of `surgery prune` (``ExpertScores``): each routed expert runs once, in the layer's own pass
(``ExpertOutputs`` in place of the experts module's forward), and the layer's output is the plain pass's."""

import pytest
import torch
from test_execution import batches
from tiny_models import save_model

from surgery.execution import layer_session
from surgery.execution.layer_pass import LayerPass
from surgery.execution.placement import Placement
from surgery.execution.routing_stats import ExpertOutputs
from surgery.execution.settings import MemoryBudget
from surgery.execution.weights import ModelWeights
from surgery.experts.scoring import ExpertScores
from surgery.io.checkpoint import Checkpoint

FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3", "qwen2_moe", "granitemoe", "gpt_oss", "olmoe"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("expert-scores")
    built = {}

    def get(family):
        if family not in built:
            built[family] = save_model(root / family, family, seed=7)
        return built[family]
    return get


def layer_inputs(directory, scored: bool, dtype: str = "float32"):
    """Every layer's input and the last output of a plain pass, or of the scoring pass (and its step)."""
    with Checkpoint.open(directory) as checkpoint:
        weights = ModelWeights.from_checkpoint(checkpoint)
        layer_pass = LayerPass(weights, batches(), Placement.resolve("cpu", dtype), MemoryBudget.parse(None))
        step = ExpertScores(weights.family, weights.config) if scored else None
        last, inputs = layer_pass.forward([step] if scored else [], keep_inputs=True, description=None)
        values = [[store.get(index, dtype=store.get(index).dtype) for index in range(len(batches()))]
                  for store in [*inputs, last]]
        return values, step


def recorded(monkeypatch) -> list:
    """The norms each ExpertOutputs handed to the REAP sums (the recording path really ran)."""
    seen, take = [], ExpertOutputs.take
    monkeypatch.setattr(ExpertOutputs, "take", lambda self: (lambda got: (seen.append(got), got)[1])(take(self)))
    return seen


@pytest.mark.parametrize("rows_per_call", [None, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_scoring_pass_gives_every_layer_the_plain_pass_output_bit_for_bit(saved, family, rows_per_call,
                                                                              monkeypatch):
    if rows_per_call:  # several calls per batch: each call's norms joined in order
        monkeypatch.setattr(layer_session, "CALL_TOKENS", rows_per_call * 12)
    seen = recorded(monkeypatch)
    plain, _ = layer_inputs(saved(family), scored=False)
    scored, step = layer_inputs(saved(family), scored=True)
    assert any(got is not None for got in seen)
    for layer, (mine, theirs) in enumerate(zip(scored, plain)):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs)), f"{family}: input of layer {layer}"
    assert set(step.sums) == set(step.layers)


def test_bfloat16_scoring_pass_is_the_plain_pass_bit_for_bit(saved):
    plain, _ = layer_inputs(saved("qwen3_moe"), scored=False, dtype="bfloat16")
    scored, _ = layer_inputs(saved("qwen3_moe"), scored=True, dtype="bfloat16")
    for mine, theirs in zip(scored, plain):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_scores_recorded_in_the_pass_equal_each_expert_run_again(saved, family, monkeypatch):
    """The norms recorded in the layer's pass give the scores that running each expert again on its tokens gives
    (the path for experts modules that do not run transformers' eager loop)."""
    _, recorded_step = layer_inputs(saved(family), scored=True)
    monkeypatch.setattr(ExpertOutputs, "applies", staticmethod(lambda module: False))
    _, rerun_step = layer_inputs(saved(family), scored=True)
    for layer in recorded_step.layers:
        mine, theirs = recorded_step.sums[layer].scores(), rerun_step.sums[layer].scores()
        assert mine["routed"] == theirs["routed"] and mine["tokens"] == theirs["tokens"]
        for key in ("reap", "activation"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=0), (family, layer, key)


def test_a_batch_whose_experts_did_not_see_the_routers_choice_runs_each_expert_again(saved, monkeypatch):
    """Recorded norms are used only for the router's own choice: a mismatch falls back to running the experts."""
    _, reference = layer_inputs(saved("mixtral"), scored=True)
    take = ExpertOutputs.take

    def shifted(self):
        got = take(self)
        return None if got is None else ((got[0] + 1) % 4, got[1])

    monkeypatch.setattr(ExpertOutputs, "take", shifted)
    _, fallback = layer_inputs(saved("mixtral"), scored=True)
    for layer in reference.layers:
        assert fallback.sums[layer].scores()["reap"] == pytest.approx(reference.sums[layer].scores()["reap"], rel=1e-6)


def scores_of(directory, streamed: bool) -> dict:
    """The scoring pass's scores, the layers' experts read together or one at a time (a layer that does not fit the
    memory budget)."""
    with Checkpoint.open(directory) as checkpoint:
        weights = ModelWeights.from_checkpoint(checkpoint)
        layer_pass = LayerPass(weights, batches(), Placement.resolve("cpu"), MemoryBudget.parse(None))
        runner = layer_pass.runner()
        runner.stream_experts = streamed
        runner.whole_layers_fit = not streamed  # as a budget too small for a whole layer decides
        reads, load_expert = [], runner.load_expert
        runner.load_expert = lambda *args: (reads.append(args[-1]), load_expert(*args))[1]
        step = ExpertScores(weights.family, weights.config)
        layer_pass.forward([step], final_output=False, description=None)
        assert bool(reads) == streamed  # the experts really were read one at a time (or really were not)
        return {layer: step.sums[layer].scores() for layer in step.layers}


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen2_moe", "llama4_text", "gpt_oss"])
def test_experts_read_one_at_a_time_score_as_experts_read_together(saved, family):
    """A layer too big for the budget reads its experts one at a time; each expert's outputs on its tokens then
    give the REAP sums as it is read: the same scores, the same routing counts."""
    together, alone = scores_of(saved(family), False), scores_of(saved(family), True)
    for layer, entry in together.items():
        assert alone[layer]["routed"] == entry["routed"] and alone[layer]["tokens"] == entry["tokens"]
        for criterion in ("reap", "activation"):
            for mine, theirs in zip(alone[layer][criterion], entry[criterion]):
                assert (mine is None) == (theirs is None)
                assert mine is None or abs(mine - theirs) <= 1e-6 * abs(theirs), (layer, criterion)
