"""Which layers of an MoE family hold experts: the rules families declare as ``Family.sparse_layers``.

A rule takes ``value`` (a config key -> its value, the family's default where the key is absent) and a layer
index, and says what transformers' decoder layer decides for that layer.
"""

from __future__ import annotations


def every_layer(value, layer: int) -> bool:
    return True


def qwen_layers(value, layer: int) -> bool:
    """Qwen2/3-MoE, Qwen3-Next: MoE unless listed in ``mlp_only_layers``, and when (l + 1) % ``decoder_sparse_step`` == 0."""
    return layer not in (value("mlp_only_layers") or []) and (layer + 1) % (value("decoder_sparse_step") or 1) == 0


def after_first_k_dense(value, layer: int) -> bool:
    """DeepSeek-V2/V3, GLM-4.5: the first ``first_k_dense_replace`` layers are dense."""
    return layer >= (value("first_k_dense_replace") or 0)


def moe_interval(value, layer: int) -> bool:
    """ERNIE 4.5: every ``moe_layer_interval``-th layer from ``moe_layer_start_index`` to ``moe_layer_end_index``."""
    end = value("moe_layer_end_index")
    end = end if end is not None and end >= 0 else layer
    return (layer + 1) % (value("moe_layer_interval") or 1) == 0 and value("moe_layer_start_index") <= layer <= end
