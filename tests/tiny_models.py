"""Tiny random checkpoints built with transformers from configs, for tests.

Each builder returns the directory it saved. Sizes are tiny on purpose (hidden 32, 2 layers) so a
whole test suite builds dozens of them in seconds; intermediate sizes are not multiples of 8 so
that code paths which assume friendly sizes are exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)

CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=44)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(intermediate_size=44, sliding_window=64)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(intermediate_size=44)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(intermediate_size=44, head_dim=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(intermediate_size=44, pad_token_id=0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(intermediate_size=44)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(intermediate_size=44, embedding_multiplier=2.0,
                                                           attention_multiplier=0.3, residual_multiplier=0.7,
                                                           logits_scaling=1.5)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(intermediate_size=20, num_local_experts=4,
                                                                    num_experts_per_tok=2, embedding_multiplier=2.0,
                                                                    attention_multiplier=0.3, residual_multiplier=0.7,
                                                                    logits_scaling=1.5)),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", dict(
        intermediate_size=20, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=16,
        embedding_multiplier=2.0, attention_multiplier=0.3, residual_multiplier=0.7, logits_scaling=1.5)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=20, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(intermediate_size=44, moe_intermediate_size=12,
                                                               shared_expert_intermediate_size=20, num_experts=4,
                                                               num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(intermediate_size=44, moe_intermediate_size=12,
                                                               num_experts=4, num_experts_per_tok=2, head_dim=8)),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM", dict(intermediate_size=20, num_experts=4,
                                                                num_experts_per_tok=2, pad_token_id=0)),
    # the MoE families users prune (read, pruned, copied; never built from a dense model)
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        intermediate_size=44, moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=8,
        qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, num_nextn_predict_layers=1,
        num_key_value_heads=4)),  # MLA: one key per head (transformers' attention needs it)
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        intermediate_size=44, moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, topk_method="group_limited_greedy", n_shared_experts=1, first_k_dense_replace=1,
        q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
        num_key_value_heads=4)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        intermediate_size=44, moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, n_shared_experts=1, first_k_dense_replace=1, head_dim=8, attention_bias=True,
        use_qk_norm=True, partial_rotary_factor=0.5, num_nextn_predict_layers=1)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(intermediate_size=12, num_local_experts=4,
                                                          num_experts_per_tok=2, head_dim=8, sliding_window=4)),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(intermediate_size=12, num_local_experts=4,
                                                                   num_experts_per_tok=2, head_dim=8)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(
        intermediate_size=44, moe_intermediate_size=12, moe_num_experts=4, moe_k=2, moe_num_shared_experts=1,
        moe_layer_start_index=1, moe_layer_interval=1, use_bias=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=12, num_experts=4, num_experts_per_tok=2)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(intermediate_size=12, num_local_experts=4,
                                                        num_experts_per_tok=2, attention_bias=True, lm_head_bias=True)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(  # hybrid: gated DeltaNet and gated attention
        num_hidden_layers=4, layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        mlp_only_layers=[2], intermediate_size=44, moe_intermediate_size=12, shared_expert_intermediate_size=20,
        num_experts=4, num_experts_per_tok=2, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=6, linear_conv_kernel_dim=3, mtp_num_hidden_layers=1)),
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(  # every layer MoE
        num_hidden_layers=4, full_attention_interval=2, moe_intermediate_size=12, shared_expert_intermediate_size=20,
        num_experts=4, num_experts_per_tok=2, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=6, linear_conv_kernel_dim=3, mtp_num_hidden_layers=1)),
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM", dict(  # MoE every other layer, chunked and NoPE layers
        num_hidden_layers=4, interleave_moe_layer_step=2, intermediate_size=12, intermediate_size_mlp=24,
        num_local_experts=4, num_experts_per_tok=2, head_dim=8, attention_chunk_size=8, pad_token_id=0)),
}
# the families never built from a dense model: read, pruned, copied and extracted only
HUB_MOES = ("deepseek_v3", "deepseek_v2", "glm4_moe", "gpt_oss", "minimax_m2", "ernie4_5_moe", "olmoe", "phimoe",
            "qwen3_next", "qwen3_5_moe_text", "llama4_text")

# multimodal checkpoints as the hub stores them: (config class, model class, the text family inside, vision config)
NESTED = {
    "llama4": ("Llama4Config", "Llama4ForConditionalGeneration", "llama4_text", dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        patch_size=14, vision_output_dim=16, projector_input_dim=16, projector_output_dim=16,
        pixel_shuffle_ratio=0.5)),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe_text", dict(
        depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2)),
}


def save_nested(directory: Path, name: str, seed: int = 0) -> Path:
    """A tiny multimodal checkpoint (`name` in ``NESTED``) whose text model is the tiny one of its text family, saved
    by transformers' multimodal class (vision tower included), with the MTP module the text family's hub
    checkpoints store."""
    import transformers

    config_class, model_class, text, vision = NESTED[name]
    _, _, extra = CONFIGS[text]
    config = getattr(transformers, config_class)(text_config={**COMMON, **extra}, vision_config=vision)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # random norms, as build_model's
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("norm.weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
    model.save_pretrained(directory)
    if getattr(config.text_config, "mtp_num_hidden_layers", None):
        add_mtp_module(Path(directory), model, prefix="model.language_model.")
    return Path(directory)


def build_model(family: str, seed: int = 0, **overrides):
    import transformers

    config_class, model_class, extra = CONFIGS[family]
    config = getattr(transformers, config_class)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():  # random norms and biases, so that copies of the wrong tensor are visible
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            elif name.endswith(".bias"):
                parameter.copy_(0.05 * torch.randn_like(parameter))
    return model.eval()


def save_model(directory: Path, family: str, seed: int = 0, dtype: str = "float32", max_shard_size=None,
               **overrides) -> Path:
    """Build a tiny `family` model and save it as safetensors (sharded when max_shard_size is set)."""
    model = build_model(family, seed, **overrides)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if getattr(model.config, "num_nextn_predict_layers", None):
        add_mtp_layer(Path(directory), model)
    elif getattr(model.config, "mtp_num_hidden_layers", None):
        add_mtp_module(Path(directory), model)
    return Path(directory)


def add_mtp_layer(directory: Path, model) -> None:
    """Append the multi-token-prediction layer hub checkpoints of DeepSeek-V3 and GLM-4.5 store after the last
    decoder layer (``model.layers.{N}``: a decoder layer's tensors plus ``enorm``, ``hnorm``, ``eh_proj`` and
    ``shared_head.norm``), random, in a shard of its own listed in the index; transformers ignores it on load."""
    state = tensors(directory)  # the stored names (per expert), as the hub's MTP layer stores them
    last, count = model.config.num_hidden_layers - 1, model.config.num_hidden_layers
    hidden = model.config.hidden_size
    generator = torch.Generator().manual_seed(7)
    mtp = {}
    for name, value in state.items():
        if name.startswith(f"model.layers.{last}."):
            mtp[name.replace(f"model.layers.{last}.", f"model.layers.{count}.")] = value.clone()
    for name, shape in (("enorm.weight", (hidden,)), ("hnorm.weight", (hidden,)), ("eh_proj.weight", (hidden, 2 * hidden)),
                        ("shared_head.norm.weight", (hidden,))):
        mtp[f"model.layers.{count}.{name}"] = torch.randn(shape, generator=generator).to(model.dtype)
    add_shard(directory, mtp, "model-mtp.safetensors")


def add_mtp_module(directory: Path, model, prefix: str = "model.") -> None:
    """The multi-token-prediction module Qwen3-Next / Qwen3.5 checkpoints store under ``mtp.``:
    ``mtp_num_hidden_layers`` copies of the last decoder layer (``mtp.layers.{i}``), ``fc``, its two input norms and a
    final norm; random where not copied, in a shard of its own; transformers ignores ``mtp.*`` on load."""
    state = tensors(directory)
    text = model.config.get_text_config()
    last, hidden = f"{prefix}layers.{text.num_hidden_layers - 1}.", text.hidden_size
    generator = torch.Generator().manual_seed(7)
    mtp = {name.replace(last, f"mtp.layers.{index}."): value.clone()
           for index in range(text.mtp_num_hidden_layers) for name, value in state.items()
           if name.startswith(last)}
    for name, shape in (("fc.weight", (hidden, 2 * hidden)), ("pre_fc_norm_embedding.weight", (hidden,)),
                        ("pre_fc_norm_hidden.weight", (hidden,)), ("norm.weight", (hidden,))):
        mtp[f"mtp.{name}"] = torch.randn(shape, generator=generator).to(model.dtype)
    add_shard(directory, mtp, "model-mtp.safetensors")


def add_shard(directory: Path, added: dict, file_name: str) -> None:
    """Save `added` tensors as one more shard of the checkpoint in `directory`, listed in its index (made if absent)."""
    from safetensors.torch import load_file, save_file

    shards = sorted(directory.glob("*.safetensors"))
    index_path = directory / "model.safetensors.index.json"
    if not index_path.exists():  # one file: move it into an index
        (shard,) = shards
        shard.rename(directory / "model-00001-of-00001.safetensors")
        weight_map = {name: "model-00001-of-00001.safetensors" for name in load_file(directory / "model-00001-of-00001.safetensors")}
        index = {"metadata": {}, "weight_map": weight_map}
    else:
        index = json.loads(index_path.read_text())
    save_file({name: value.contiguous() for name, value in added.items()}, directory / file_name,
              metadata={"format": "pt"})
    index["weight_map"].update({name: file_name for name in added})
    index_path.write_text(json.dumps(index, indent=2))


def load_model(directory: Path):
    """Load with transformers, failing on any missing, unexpected or mismatched key."""
    import transformers

    # eager experts: transformers' grouped expert matmul fails on CPU for odd expert sizes (split's)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True,
                                                                    dtype=torch.float32,
                                                                    experts_implementation="eager")
    mtp = f"model.layers.{model.config.num_hidden_layers}."  # a hub checkpoint's MTP layer: transformers skips it
    info["unexpected_keys"] = [key for key in info.get("unexpected_keys") or () if not key.startswith(mtp)]
    problems = {key: value for key, value in info.items() if value and key != "error_msgs"}
    assert not problems, f"loading {directory}: {problems}"
    return model.eval()


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def sample_ids(vocab_size: int = 96, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, length), generator=generator)


def router_inputs_by_hooks(model, batches, layers) -> dict:
    """{layer: [real tokens, hidden]}: the input of each decoder layer's `mlp` block (what an MoE router
    reads), on unpadded tokens, from transformers' whole model with forward pre-hooks: the reference
    that layer-by-layer captures are checked against."""
    captured = {layer: [] for layer in layers}
    handles = [model.model.layers[layer].mlp.register_forward_pre_hook(
        lambda _module, args, layer=layer: captured[layer].append(args[0].detach())) for layer in layers]
    out = {layer: [] for layer in layers}
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                keep = batch.attention_mask.reshape(-1).bool()
                for layer in layers:
                    value = captured[layer].pop()
                    out[layer].append(value.reshape(-1, value.shape[-1])[keep].float())
    finally:
        for handle in handles:
            handle.remove()
    return {layer: torch.cat(values) for layer, values in out.items()}


def tensors(directory: Path) -> dict:
    """Every stored tensor of a checkpoint directory, by name (all shards)."""
    from safetensors import safe_open

    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out
