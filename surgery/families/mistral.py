"""Mistral (MistralForCausalLM), dense: no biases. It becomes Mixtral, whose attention is the same:
``sliding_window`` (4096 where absent, none where null) applies to every layer. Mixtral's absent
``sliding_window`` means none, so the translation writes the window out."""

from surgery.families.base import BASE_DEFAULTS, NORMS, QKVO, Conversion, Family, L, specs
from surgery.families.sliding import SlidingWindow

FAMILY = Family(
    "mistral", "MistralForCausalLM", "dense", specs("attention", L, QKVO) + NORMS,
    defaults=BASE_DEFAULTS,
    conversions={"mixtral": Conversion()},
    default_target="mixtral",
    sliding=SlidingWindow(defaults={"sliding_window": 4096}),
)
