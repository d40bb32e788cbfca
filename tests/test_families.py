"""The families name and shape every tensor exactly as transformers saves it, and translate configs."""

import json

import pytest

from surgery import families as arch
from surgery.checkpoint import Checkpoint
from surgery.errors import SurgeryError
from tiny_models import CONFIGS, save_model


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_expected_tensors_match_what_transformers_saves(tmp_path, family):
    directory = save_model(tmp_path / family, family)
    checkpoint = Checkpoint.open(directory, require_config=True)
    found = arch.detect_family(checkpoint.config)
    assert found.name == family
    layout = arch.detect_expert_layout(found, checkpoint.tensors)
    expected = arch.expected_tensors(found, checkpoint.config, layout)
    assert {name: e.shape for name, e in expected.items()} == {n: i.shape for n, i in checkpoint.tensors.items()}


@pytest.mark.parametrize("family,key", [("llama", "attention_bias"), ("qwen3", "attention_bias")])
def test_bias_tensors_follow_the_config_flag(tmp_path, family, key):
    directory = save_model(tmp_path / family, family, **{key: True})
    checkpoint = Checkpoint.open(directory, require_config=True)
    expected = arch.expected_tensors(arch.detect_family(checkpoint.config), checkpoint.config)
    assert set(expected) == set(checkpoint.tensors)
    assert any(name.endswith("q_proj.bias") for name in expected)


def test_tied_embeddings_have_no_lm_head(tmp_path):
    directory = save_model(tmp_path / "tied", "llama", tie_word_embeddings=True)
    checkpoint = Checkpoint.open(directory, require_config=True)
    expected = arch.expected_tensors(arch.detect_family(checkpoint.config), checkpoint.config)
    assert "lm_head.weight" not in expected and set(expected) == set(checkpoint.tensors)


def test_qwen_moe_dense_layers_follow_mlp_only_layers(tmp_path):
    directory = save_model(tmp_path / "q", "qwen2_moe", mlp_only_layers=[1])
    checkpoint = Checkpoint.open(directory, require_config=True)
    family = arch.detect_family(checkpoint.config)
    assert [arch.is_moe_layer(family, checkpoint.config, layer) for layer in range(2)] == [True, False]
    assert set(arch.expected_tensors(family, checkpoint.config)) == set(checkpoint.tensors)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(SurgeryError, match=r"'GPT2LMHeadModel' is not supported \(supported: LlamaForCausalLM"):
        arch.detect_family({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_heads_that_do_not_divide_are_refused():
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_attention_heads": 4,
              "num_key_value_heads": 3, "vocab_size": 10, "num_hidden_layers": 1, "intermediate_size": 8}
    with pytest.raises(SurgeryError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"):
        arch.dimensions(arch.FAMILIES["llama"], config)


def test_moe_config_carries_rope_and_sets_moe_keys():
    source = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
              "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0},
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_theta": 500000.0,
              "rms_norm_eps": 1e-5, "head_dim": 8, "max_position_embeddings": 4096, "tie_word_embeddings": True,
              "bos_token_id": 5, "eos_token_id": [6, 7], "intermediate_size": 44}
    family = arch.FAMILIES["llama"]
    target = arch.moe_target(family, "auto", source)
    config = arch.moe_config(family, source, target, num_experts=8, top_k=2, expert_ffn=44)
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    for key in ("rope_parameters", "rope_scaling", "rope_theta", "rms_norm_eps", "head_dim",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert config[key] == source[key], key
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (8, 2, 44)
    assert config["sliding_window"] is None


def test_qwen3_moe_config_uses_num_experts_and_normalised_topk():
    source = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "intermediate_size": 44}
    family = arch.FAMILIES["qwen3"]
    config = arch.moe_config(family, source, arch.moe_target(family, "auto", source), num_experts=4, top_k=2, expert_ffn=44)
    assert config["num_experts"] == 4 and config["norm_topk_prob"] is True and config["moe_intermediate_size"] == 44


def test_bias_source_cannot_become_mixtral():
    with pytest.raises(SurgeryError, match="attention_bias is true, but mixtral has no such weights"):
        arch.moe_target(arch.FAMILIES["llama"], "mixtral", {"attention_bias": True})


def test_qwen2_cannot_become_mixtral():
    with pytest.raises(SurgeryError, match="a qwen2 model cannot become mixtral"):
        arch.moe_target(arch.FAMILIES["qwen2"], "mixtral", {})


def test_mixtral_refuses_dense_layers():
    source = {"architectures": ["LlamaForCausalLM"], "intermediate_size": 44}
    family = arch.FAMILIES["llama"]
    with pytest.raises(SurgeryError, match="mixtral makes every layer MoE"):
        arch.moe_config(family, source, arch.FAMILIES["mixtral"], num_experts=4, top_k=2, expert_ffn=44, dense_layers=[1])
