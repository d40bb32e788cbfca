"""`surgery inspect`: architecture, counts, per-layer groups, problems, statistics."""

import json

import torch
from safetensors.torch import load_file, save_file
from tiny_models import build_model, save_model


def inspect_json(run_cli, *args):
    code, out, err = run_cli("inspect", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_dense_summary_matches_the_model(tmp_path, run_cli):
    directory = save_model(tmp_path / "m", "llama")
    report = inspect_json(run_cli, directory)
    model = build_model("llama")
    assert report["architecture"] == "LlamaForCausalLM" and report["kind"] == "dense"
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["summary"] == {"layers": 2, "hidden_size": 32, "intermediate_size": 44, "attention_heads": 4,
                                 "kv_heads": 2, "head_dim": 8, "vocab_size": 96, "tie_word_embeddings": False}
    assert report["problems"] == [] and report["dtypes"] == {"F32": len(model.state_dict())}


def test_moe_summary_counts_active_parameters(tmp_path, run_cli):
    directory = save_model(tmp_path / "m", "mixtral")
    report = inspect_json(run_cli, directory)
    experts = 2 * 4 * 3 * 20 * 32  # layers x experts x matrices x expert_ffn x hidden
    assert report["moe"]["experts"] == 4 and report["moe"]["top_k"] == 2 and report["moe"]["moe_layers"] == [0, 1]
    assert report["parameters"] - report["active_parameters"] == experts // 2


def test_shared_expert_and_dense_layers_are_reported(tmp_path, run_cli):
    directory = save_model(tmp_path / "m", "qwen2_moe", mlp_only_layers=[0])
    report = inspect_json(run_cli, directory)
    assert report["moe"]["shared_expert_intermediate_size"] == 20
    assert report["moe"]["moe_layers"] == [1] and report["moe"]["dense_layers"] == [0]
    assert report["problems"] == []


def test_fused_expert_layout_is_understood(tmp_path, run_cli):
    model = build_model("qwen3_moe")
    tensors = {name: value.contiguous() for name, value in model.state_dict().items()}
    assert any(name.endswith("experts.gate_up_proj") for name in tensors)
    (tmp_path / "m").mkdir()
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    model.config.to_json_file(tmp_path / "m" / "config.json")
    report = inspect_json(run_cli, tmp_path / "m")
    assert report["expert_layout"] == "fused" and report["problems"] == []


def test_shape_disagreeing_with_config_is_a_problem(tmp_path, run_cli):
    directory = save_model(tmp_path / "m", "llama")
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 48
    (directory / "config.json").write_text(json.dumps(config))
    report = inspect_json(run_cli, directory)
    assert "model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape [44, 32], config.json implies [48, 32]" in report["problems"]


def test_missing_and_unexpected_tensors_are_problems(tmp_path, run_cli):
    directory = save_model(tmp_path / "m", "llama")
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.0.mlp.up.weight"] = tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    problems = inspect_json(run_cli, directory)["problems"]
    assert "missing tensor model.layers.0.mlp.up_proj.weight (expected shape [44, 32])" in problems
    assert any(p.startswith("unexpected tensor model.layers.0.mlp.up.weight") for p in problems)


def test_strict_exits_2_on_problems(tmp_path, run_cli):
    directory = save_model(tmp_path / "m", "llama")
    config = json.loads((directory / "config.json").read_text())
    config["vocab_size"] = 100
    (directory / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli("inspect", directory, "--strict")
    assert code == 2 and "problem(s) found" in err


def test_tensors_lists_offsets_that_point_at_the_data(tmp_path, run_cli):
    directory = save_model(tmp_path / "m", "llama")
    report = inspect_json(run_cli, directory, "--filter", r"norm\.weight$")
    entry = next(t for t in report["tensors"] if t["name"] == "model.norm.weight")
    raw = (directory / "model.safetensors").read_bytes()[entry["offset"]:entry["offset"] + entry["bytes"]]
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32), load_file(directory / "model.safetensors")["model.norm.weight"])
    assert all("norm" in t["name"] for t in report["tensors"])


def test_stats_count_nan_and_inf(tmp_path, run_cli):
    directory = save_model(tmp_path / "m", "llama")
    tensors = load_file(directory / "model.safetensors")
    tensors["model.norm.weight"][:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    code, out, err = run_cli("inspect", directory, "--stats", "--json")
    stats = json.loads(out)["stats"]["model.norm.weight"]
    assert (stats["nan"], stats["inf"]) == (1, 2)
    assert code == 0 and f"{directory / 'model.safetensors'}: tensor 'model.norm.weight' has 1 NaN and 2 Inf" in err


def test_inspect_without_config_still_shows_layout(tmp_path, run_cli):
    save_file({"model.layers.0.x": torch.zeros(3)}, tmp_path / "model.safetensors")
    report = inspect_json(run_cli, tmp_path / "model.safetensors")
    assert report["parameters"] == 3 and report["architecture"] is None
