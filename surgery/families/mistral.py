"""Mistral (MistralForCausalLM), dense: no biases. It becomes Mixtral, whose attention is the same
(``sliding_window`` carried over)."""

from surgery.families.base import BASE_DEFAULTS, L, NORMS, QKVO, Conversion, Family, specs

FAMILY = Family(
    "mistral", "MistralForCausalLM", "dense", specs("attention", L, QKVO) + NORMS,
    defaults=BASE_DEFAULTS,
    conversions={"mixtral": Conversion()},
    default_target="mixtral",
)
