"""Qwen2 (Qwen2ForCausalLM), dense: q/k/v biases (``qkv_bias``, on unless the config says otherwise).
It becomes Qwen2-MoE, which has the same attention; the bias flag is written out explicitly.

Sliding window: with ``use_sliding_window`` on, the layers ``layer_types`` marks slide; absent, layers
from ``max_window_layers`` on. Qwen2-MoE derives an absent ``layer_types`` differently (even layers
below ``max_window_layers``), so the translation writes the source's ``layer_types`` out.
"""

from surgery.families.base import BASE_DEFAULTS, NORMS, QKVO, Conversion, Family, L, qkv_bias, specs
from surgery.families.sliding import SLIDING_FROM_MAX_WINDOW_LAYERS

FAMILY = Family(
    "qwen2", "Qwen2ForCausalLM", "dense", specs("attention", L, QKVO + qkv_bias("qkv_bias")) + NORMS,
    defaults={**BASE_DEFAULTS, "qkv_bias": True},
    conversions={"qwen2_moe": Conversion(copy_keys={"qkv_bias": "qkv_bias"})},
    default_target="qwen2_moe",
    sliding=SLIDING_FROM_MAX_WINDOW_LAYERS,
)
