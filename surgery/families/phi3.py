"""Phi-3 / Phi-4-mini (Phi3ForCausalLM), dense, with fused projections.

Phi-3 stores q, k and v in one ``self_attn.qkv_proj`` (q rows, then k, then v) and the FFN's gate
and up in one ``mlp.gate_up_proj`` (gate rows, then up); transformers' module holds them the same
way. As a source, each role is a view of its fused tensor, so upcycle, split and merge write
Mixtral's separate q/k/v and w1/w3 as byte copies of those rows. Its decoder layer is Mistral's
(RMSNorm, pre-norm, rotary attention with an optional sliding window, no biases); the long-context
rope variants (``rope_parameters``: longrope and its factors) are carried verbatim. Phi-4-mini rotates
only part of each head (``partial_rotary_factor`` 0.75), which Mixtral's attention cannot do: refused.
PhiMoE (its own MoE) normalises with LayerNorm with bias, which no RMSNorm target reproduces.
"""

from surgery.families.base import BASE_DEFAULTS, DENSE_FFN, NORMS, QKVO, Conversion, Family, FusedSource, L, specs
from surgery.families.sliding import SlidingWindow

FAMILY = Family(
    "phi3", "Phi3ForCausalLM", "dense",
    specs("attention", L, QKVO) + NORMS,
    dense_ffn=DENSE_FFN,
    defaults=BASE_DEFAULTS,
    fused_sources=(FusedSource("attention", L + "self_attn.qkv_proj.weight", ("q", "k", "v")),
                   FusedSource("ffn", L + "mlp.gate_up_proj.weight", ("gate", "up"))),
    conversions={
        "mixtral": Conversion(require={"rope_parameters.partial_rotary_factor": (
            1.0, "mixtral's attention rotates every dimension of each head")}),
    },
    default_target="mixtral",
    sliding=SlidingWindow(defaults={"sliding_window": None}),  # one window for every layer, none where null
)
