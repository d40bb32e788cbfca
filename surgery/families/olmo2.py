"""OLMo 2 (Olmo2ForCausalLM), dense, post-norm: no norm before attention or the FFN; each block's
output is normed (``post_attention_layernorm``, ``post_feedforward_layernorm``) before it is added
to the residual stream, so the FFN (``mlp``) reads the post-attention residual stream itself. q/k
norms span the whole projection (q_dim / kv_dim), not one head; ``attention_bias`` adds q/k/v/o
biases; the FFN never has biases.

It becomes FlexOlmo, whose attention and norms are the same. FlexOlmo's defaults differ from
OLMo 2's (``rms_norm_eps`` 1e-6 vs 1e-5): the source's value is written out explicitly.
"""

from surgery.families.base import BASE_DEFAULTS, DENSE_FFN, O_BIAS, QKVO, Conversion, Family, L, qkv_bias, specs

QK_NORM_FULL = [("q_norm", "self_attn.q_norm.weight", ("q_dim",)), ("k_norm", "self_attn.k_norm.weight", ("kv_dim",))]
POST_NORMS = specs("norm", L, [
    ("post_attention_norm", "post_attention_layernorm.weight", ("hidden",)),
    ("post_feedforward_norm", "post_feedforward_layernorm.weight", ("hidden",)),
])

FAMILY = Family(
    "olmo2", "Olmo2ForCausalLM", "dense",
    specs("attention", L, QKVO + qkv_bias("attention_bias") + O_BIAS + QK_NORM_FULL) + POST_NORMS,
    dense_ffn=tuple(spec for spec in DENSE_FFN if spec.when is None),  # Olmo2MLP has no bias, whatever mlp_bias says
    defaults={**BASE_DEFAULTS, "rms_norm_eps": 1e-5},
    router_input="mlp",  # post-norm: the mlp input is the residual stream after attention, not a norm output
    conversions={"flex_olmo": Conversion(copy_keys={"rms_norm_eps": "rms_norm_eps"})},
    default_target="flex_olmo",
)
