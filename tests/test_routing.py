"""Routing statistics: hooks on the routers, checked against a hand computation from the checkpoint."""

import math

import pytest
import torch
from tiny_models import build_model, router_inputs_by_hooks, save_model

from surgery import families as arch
from surgery.checks.report_view import load_bars
from surgery.execution.batches import batches
from surgery.execution.routing_stats import routing_statistics
from surgery.io.checkpoint import Checkpoint

ROWS = [list(range(3, 40)), list(range(50, 61)), [7, 9, 11, 13, 90, 91, 92]]  # unequal lengths: padding


def padded_batches(batch_size=3):
    return list(batches(ROWS, batch_size, seq_len=64, pad_token_id=5))


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    directory = save_model(tmp_path_factory.mktemp("routing") / "mixtral", "mixtral", seed=3)
    from surgery.execution.loading import load_model

    return directory, load_model(directory)


def hand_statistics(directory, model, layer, alpha=0.01):
    """Router logits from the checkpoint's router weight and the captured router input, by hand."""
    with Checkpoint.open(directory, require_config=True) as checkpoint:
        family = arch.detect_family(checkpoint.config)
        weight = checkpoint.read(family.router.name(layer)).double()
        experts, top_k = checkpoint.config["num_local_experts"], checkpoint.config["num_experts_per_tok"]
    hidden = router_inputs_by_hooks(model, padded_batches(), [layer])[layer].double()  # real tokens only
    logits = hidden @ weight.T
    probs = torch.softmax(logits, -1)
    chosen = torch.topk(probs, top_k, -1).indices
    counts = torch.zeros(experts, dtype=torch.float64)
    for token in chosen:
        for expert in token:
            counts[expert] += 1
    share = counts / counts.sum()
    mean_probability = probs.mean(0)
    return {
        "tokens": hidden.shape[0],
        "share": share,
        "mean_probability": mean_probability,
        "load_entropy": float(-sum(u * math.log(u) for u in share if u > 0)),
        "router_entropy": float(-(probs * probs.log()).sum(-1).mean()),
        "load_balancing_loss": alpha * experts * float((share * mean_probability).sum()),
        "router_z_loss": float((torch.logsumexp(logits, -1) ** 2).mean()),
        "unused_experts": [e for e in range(experts) if counts[e] == 0],
    }


def test_shares_sum_to_one_per_layer(mixtral):
    _, model = mixtral
    stats = routing_statistics(model, padded_batches())
    assert [layer["layer"] for layer in stats] == [0, 1]
    for layer in stats:
        assert sum(layer["share"]) == pytest.approx(1.0, abs=1e-12)
        assert sum(layer["mean_probability"]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("layer", [0, 1])
def test_statistics_match_a_hand_computation(mixtral, layer):
    directory, model = mixtral
    measured = routing_statistics(model, padded_batches())[layer]
    expected = hand_statistics(directory, model, layer)
    assert measured["tokens"] == expected["tokens"] == sum(len(row) for row in ROWS)
    assert measured["share"] == pytest.approx(expected["share"].tolist(), abs=1e-12)
    assert measured["mean_probability"] == pytest.approx(expected["mean_probability"].tolist(), abs=1e-6)
    for key in ("load_entropy", "router_entropy", "load_balancing_loss", "router_z_loss"):
        assert measured[key] == pytest.approx(expected[key], rel=1e-5), key
    assert measured["unused_experts"] == expected["unused_experts"]


def test_padding_is_masked_out(mixtral):
    _, model = mixtral
    padded = routing_statistics(model, padded_batches(batch_size=3))
    unpadded = routing_statistics(model, padded_batches(batch_size=1))
    assert padded_batches(3)[0].attention_mask.eq(0).any()
    for a, b in zip(padded, unpadded):
        assert a["tokens"] == b["tokens"]
        assert a["share"] == pytest.approx(b["share"], abs=1e-12)
        assert a["router_z_loss"] == pytest.approx(b["router_z_loss"], rel=1e-5)


def test_uniform_router_gives_alpha_and_squared_log_n():
    model = build_model("mixtral")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
    stats = routing_statistics(model, padded_batches())
    for layer in stats:
        assert layer["mean_probability"] == pytest.approx([0.25] * 4)
        assert layer["load_balancing_loss"] == pytest.approx(0.01)
        assert layer["router_z_loss"] == pytest.approx(math.log(4) ** 2)
        assert layer["router_entropy"] == pytest.approx(math.log(4))


def test_experts_never_chosen_are_reported_unused():
    model = build_model("mixtral", num_experts_per_tok=1)
    with torch.no_grad():
        for layer in model.model.layers:
            direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[1] = direction  # experts 1 and 2: logits +-(d.x); 0 and 3: logit 0,
            layer.mlp.gate.weight[2] = -direction  # so the top-1 expert is always 1 or 2
    stats = routing_statistics(model, padded_batches())
    for layer in stats:
        assert layer["unused_experts"] == [0, 3]
        assert layer["share"][0] == layer["share"][3] == 0.0
        assert load_bars(layer["share"])[::3] == "··"


def test_dense_model_has_no_routing():
    assert routing_statistics(build_model("llama"), padded_batches()) == []


def test_only_moe_layers_are_hooked_and_shared_gate_is_not_a_router():
    model = build_model("qwen2_moe", mlp_only_layers=[0])
    stats = routing_statistics(model, padded_batches())
    assert [layer["layer"] for layer in stats] == [1]
    assert stats[0]["experts"] == 4 and stats[0]["top_k"] == 2


def test_load_bars_show_unused_and_balance():
    assert load_bars([0.0, 0.25, 0.5, 0.25]) == "·▄█▄"
