"""Qwen3 (Qwen3ForCausalLM), dense: per-head q/k norms, optional attention biases (``attention_bias``).
It becomes Qwen3-MoE, which has the same attention but no FFN biases (a source with ``mlp_bias`` is
refused).

Sliding window: as Qwen2 (``layer_types``, or layers from ``max_window_layers`` on). Qwen3-MoE slides
every layer or none, so a source where only some layers slide is refused.
"""

from surgery.families.base import BASE_DEFAULTS, NORMS, O_BIAS, QK_NORM, QKVO, Conversion, Family, L, qkv_bias, specs
from surgery.families.sliding import SLIDING_FROM_MAX_WINDOW_LAYERS

FAMILY = Family(
    "qwen3", "Qwen3ForCausalLM", "dense",
    specs("attention", L, QKVO + qkv_bias("attention_bias") + O_BIAS + QK_NORM) + NORMS,
    defaults=BASE_DEFAULTS,
    conversions={"qwen3_moe": Conversion(refuse_if=("mlp_bias",))},
    default_target="qwen3_moe",
    sliding=SLIDING_FROM_MAX_WINDOW_LAYERS,
)
