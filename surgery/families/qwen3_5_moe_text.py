"""Qwen3.5 MoE, text only (Qwen3_5MoeForCausalLM, ``model_type`` ``qwen3_5_moe_text``). MoE, hybrid attention.

Qwen3-Next's layers (``qwen3_next``: gated DeltaNet ``linear_attn`` and gated full ``self_attn``, by ``layer_types``
or ``full_attention_interval``), with the DeltaNet's input projections split (``in_proj_qkv``, ``in_proj_z``,
``in_proj_b``, ``in_proj_a``); every layer is MoE, the router always renormalises its top-k weights, and one shared
expert is gated by ``sigmoid(mlp.shared_expert_gate(x))``. ``mtp_num_hidden_layers`` multi-token-prediction layers
may be stored under ``mtp.``; transformers ignores them on load.

This family reads the text model's own layout, ``model.layers.*`` under a text config (what Qwen3_5MoeForCausalLM
built from a ``Qwen3_5MoeTextConfig`` saves). Hub checkpoints (Qwen3.5-35B-A3B ...) are the multimodal
Qwen3_5MoeForConditionalGeneration (``model_type`` ``qwen3_5_moe``: the text config nested under ``text_config``, the
text weights under ``model.language_model.``, a vision tower under ``model.visual.``), and transformers writes a text
model loaded from one back under ``model.language_model.``: neither layout is read here.
"""

from surgery.families.base import BASE_DEFAULTS, FUSED_EXPERTS, NORMS, Family, L, Spec, per_expert, specs
from surgery.families.qwen2_moe import SHARED_EXPERT
from surgery.families.qwen3_next import DELTANET_CORE, GATED_ATTENTION, LINEAR, LINEAR_DEFAULTS, layer_kind, linear_dims

DELTANET = specs("attention", L + "linear_attn.", [
    ("linear_qkv", "in_proj_qkv.weight", ("linear_conv_dim", "hidden"), None, LINEAR),
    ("linear_z", "in_proj_z.weight", ("linear_value_dim", "hidden"), None, LINEAR),
    ("linear_b", "in_proj_b.weight", ("linear_v_heads", "hidden"), None, LINEAR),
    ("linear_a", "in_proj_a.weight", ("linear_v_heads", "hidden"), None, LINEAR),
] + DELTANET_CORE)

FAMILY = Family(
    "qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", "moe", GATED_ATTENTION + DELTANET + NORMS,
    dense_ffn=(),
    router=Spec("router", "router", L + "mlp.gate.weight", ("experts", "hidden")),
    experts=per_expert("mlp.", "gate_proj", "up_proj", "down_proj"),
    fused_experts=FUSED_EXPERTS,
    shared_expert=SHARED_EXPERT,
    defaults={**BASE_DEFAULTS, **LINEAR_DEFAULTS},
    moe_keys={"experts": ("num_experts",), "top_k": ("num_experts_per_tok",),
              "expert_ffn": ("moe_intermediate_size",), "shared_ffn": ("shared_expert_intermediate_size",)},
    derived_dims=linear_dims,
    layer_type=layer_kind,
    attention_modules={LINEAR: "linear_attn"},
    top_k_norm=None,
    mtp_prefixes=lambda config: ["mtp."],
    mtp_off={"mtp_num_hidden_layers": 0},
    dense_form="every layer of its config is MoE, and transformers' dense Qwen3.5 (Qwen3_5ForCausalLM) is no family "
               "here",
)
