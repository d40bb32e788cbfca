"""Llama (LlamaForCausalLM), dense.

``attention_bias`` adds q/k/v/o biases and ``mlp_bias`` FFN biases. It becomes Mixtral (auto) or
Qwen2-MoE; neither has an o_proj bias or FFN biases, so a source with either flag is refused.
Llama has no sliding-window attention (whatever sliding keys its config holds): its MoE config gets none.
"""

from surgery.families.base import BASE_DEFAULTS, NORMS, O_BIAS, QKVO, Conversion, Family, L, qkv_bias, specs

FAMILY = Family(
    "llama", "LlamaForCausalLM", "dense",
    specs("attention", L, QKVO + qkv_bias("attention_bias") + O_BIAS) + NORMS,
    defaults=BASE_DEFAULTS,
    conversions={
        "mixtral": Conversion(refuse_if=("attention_bias", "mlp_bias"), set_keys={"sliding_window": None}),
        "qwen2_moe": Conversion(refuse_if=("attention_bias", "mlp_bias"),
                                set_keys={"qkv_bias": False, "use_sliding_window": False, "sliding_window": None}),
    },
    default_target="mixtral",
)
