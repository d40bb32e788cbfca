"""Granite (GraniteForCausalLM), dense: Llama's tensors with four scalar multipliers.

``embedding_multiplier`` scales the embeddings, ``attention_multiplier`` replaces 1/sqrt(head_dim),
``residual_multiplier`` scales each block's output before the residual add and ``logits_scaling``
divides the logits. GraniteMoE reads the same four keys, so they are carried verbatim and the MoE
reproduces the source. GraniteMoE and GraniteMoeShared (its variant with a shared expert, for
``upcycle --shared-expert`` and splits with shared neurons) have no FFN biases: a source with
``mlp_bias`` is refused.
"""

from surgery.families.base import BASE_DEFAULTS, NORMS, O_BIAS, QKVO, Conversion, Family, L, qkv_bias, specs

FAMILY = Family(
    "granite", "GraniteForCausalLM", "dense",
    specs("attention", L, QKVO + qkv_bias("attention_bias") + O_BIAS) + NORMS,
    defaults=BASE_DEFAULTS,
    conversions={"granitemoe": Conversion(refuse_if=("mlp_bias",)),
                 "granitemoeshared": Conversion(refuse_if=("mlp_bias",))},
    default_target="granitemoe",
)
