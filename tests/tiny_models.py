"""Tiny random checkpoints built with transformers from configs, for tests.

Each builder returns the directory it saved. Sizes are tiny on purpose (hidden 32, 2 layers) so a
whole test suite builds dozens of them in seconds; intermediate sizes are not multiples of 8 so
that code paths which assume friendly sizes are exercised.
"""

from __future__ import annotations

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
}


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
    return Path(directory)


def load_model(directory: Path):
    """Load with transformers, failing on any missing, unexpected or mismatched key."""
    import transformers

    # eager experts: transformers' grouped expert matmul fails on CPU for odd expert sizes (split's)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True,
                                                                    dtype=torch.float32,
                                                                    experts_implementation="eager")
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
