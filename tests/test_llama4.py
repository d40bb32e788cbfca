"""Llama 4's text model (Llama4ForCausalLM): what differs from transformers 5's other MoEs. Its router returns (sigmoid
scores of the top-k, logits), its experts take every token scaled by its score (input-major fused tensors), it keeps
a shared expert and a dense MLP of its own width in the layers that are not MoE. The tests every family passes are in
test_hub_moes.py; the multimodal layout the hub stores it in is in test_nested.py."""

import json

import pytest
import torch
from tiny_models import load_model, logits, sample_ids, save_model

from surgery import families as arch


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("llama4") / "llama4", "llama4_text", seed=5)


def test_the_moe_layers_are_every_interleave_step_and_the_others_dense(source):
    config = json.loads((source / "config.json").read_text())
    family = arch.detect_family(config)
    assert family.name == "llama4_text"
    assert arch.moe_layers(family, config) == [1, 3]
    assert arch.moe_layers(family, {**config, "moe_layers": None}) == [1, 3]  # from interleave_moe_layer_step
    assert arch.moe_layers(family, {**config, "moe_layers": [0]}) == [0]


def test_the_router_output_is_read_as_its_own_top_k_and_scores(source):
    model = load_model(source)
    router = model.model.layers[1].feed_forward.router
    rows = torch.randn(5, 32)
    with torch.no_grad():
        output = router(rows)
    logits_, weights, chosen = arch.routing_of(arch.FAMILIES["llama4_text"], output, 2)
    assert torch.equal(logits_, output[1])
    assert torch.equal(chosen, output[1].topk(2, dim=-1).indices)
    assert torch.equal(weights, torch.sigmoid(output[1].gather(-1, chosen)))


def expert_outputs(moe, rows):
    """Each expert's output on every row at weight 1, from transformers' experts module run on all experts at once:
    [experts, rows, hidden]."""
    experts = moe.experts.num_experts
    with torch.no_grad():
        out = moe.experts(rows.repeat(experts, 1))
    return out.view(experts, len(rows), -1)


def test_reap_is_the_gate_weight_times_each_experts_own_output_norm(source, tmp_path, run_cli, token_file):
    """Scores measured independently: hooks on transformers' MoE block see each token and the router's choice."""
    scores_file = tmp_path / "scores.json"
    code, _, err = run_cli("prune", source, tmp_path / "out", "--keep", 2, "--calibration", token_file,
                           "--save-scores", scores_file, "--dry-run")
    assert code == 0, err
    saved = json.loads(scores_file.read_text())
    model = load_model(source)
    ids = torch.tensor([json.loads(line) for line in token_file.read_text().splitlines()])
    seen = {}

    def hook(layer):
        def capture(moe, args):
            rows = args[0].reshape(-1, args[0].shape[-1])
            scores, router_logits = moe.router(rows)
            chosen = router_logits.topk(2, dim=-1).indices
            norms = expert_outputs(moe, rows).norm(dim=-1).double()  # [experts, rows]
            reap, norm, count = (torch.zeros(4, dtype=torch.float64) for _ in range(3))
            for expert in range(4):
                token = (chosen == expert).any(dim=-1).nonzero().flatten()
                reap[expert] = (scores[token, expert].double() * norms[expert, token]).sum()
                norm[expert], count[expert] = norms[expert, token].sum(), len(token)
            seen[layer] = (reap / count, norm / count)
        return capture

    handles = [model.model.layers[layer].feed_forward.register_forward_pre_hook(hook(layer)) for layer in (1, 3)]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    for layer, (reap, activation) in seen.items():
        entry = saved["layers"][str(layer)]
        assert entry["reap"] == pytest.approx(reap.tolist(), rel=1e-4)
        assert entry["activation"] == pytest.approx(activation.tolist(), rel=1e-4)


def test_extract_makes_every_layer_dense_with_the_expert_and_the_shared_expert(source, tmp_path, run_cli):
    code, _, err = run_cli("extract", source, tmp_path / "dense", "--expert", 2)
    assert code == 0, err
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["moe_layers"] == [] and config["intermediate_size_mlp"] == 24  # expert 12 + shared 12
    assert "expert 2's (its gate_up and down transposed into gate, up and down)" in err
    dense, moe = load_model(tmp_path / "dense"), load_model(source)  # strict: no missing or unexpected key
    rows = torch.randn(6, 32)
    for layer in (1, 3):
        block = moe.model.layers[layer].feed_forward
        with torch.no_grad():
            expected = expert_outputs(block, rows)[2] + block.shared_expert(rows)
            got = dense.model.layers[layer].feed_forward(rows)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the dense layers are copied
        torch.testing.assert_close(dense.model.layers[0].feed_forward(rows), moe.model.layers[0].feed_forward(rows),
                                   rtol=0, atol=0)
    assert torch.isfinite(logits(dense, sample_ids())).all()


def test_prune_copies_the_kept_experts_as_byte_ranges_of_the_fused_tensors(source, tmp_path, run_cli):
    """A fused [E, H, 2I] tensor's kept experts are written one after another as byte copies (kernel copies, never
    the tensor in memory), in the kept order."""
    code, out, err = run_cli("prune", source, tmp_path / "out", "--keep", 2, "--criterion", "random", "--dry-run",
                             "--json")
    assert code == 0, err
    plan = json.loads(out)
    kept = plan["prune"]["layers"]["1"]["kept"]
    recipe = next(t["recipe"] for t in plan["tensors"] if t["name"] == "model.layers.1.feed_forward.experts.gate_up_proj")
    first = f"copy model.layers.1.feed_forward.experts.gate_up_proj[rows {kept[0] * 32}:{kept[0] * 32 + 32}]"
    assert recipe == f"joined(2: {first}, ...)"
