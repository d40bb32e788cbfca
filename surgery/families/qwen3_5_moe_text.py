"""Qwen3.5 MoE, text only (Qwen3_5MoeForCausalLM, ``model_type`` ``qwen3_5_moe_text``). MoE, hybrid attention.

Qwen3-Next's layers (``qwen3_next``: gated DeltaNet ``linear_attn`` and gated full ``self_attn``, by ``layer_types``
or ``full_attention_interval``), with the DeltaNet's input projections split (``in_proj_qkv``, ``in_proj_z``,
``in_proj_b``, ``in_proj_a``); every layer is MoE, the router always renormalises its top-k weights, and one shared
expert is gated by ``sigmoid(mlp.shared_expert_gate(x))``. ``mtp_num_hidden_layers`` multi-token-prediction layers
may be stored under ``mtp.``; transformers ignores them on load.

This family reads the text model's own layout, ``model.layers.*`` under a text config (what Qwen3_5MoeForCausalLM
built from a ``Qwen3_5MoeTextConfig`` saves). Hub checkpoints (Qwen3.5-35B-A3B ...) are the multimodal
Qwen3_5MoeForConditionalGeneration (``model_type`` ``qwen3_5_moe``: the text config nested under ``text_config``, the
text weights under ``model.language_model.``, a vision tower under ``model.visual.``, the MTP module under ``mtp.``):
``NESTING`` says so, and surgery reads the text model inside, carrying the vision tower as bytes.
"""

from dataclasses import replace

from surgery.families import qwen3_next
from surgery.families.base import BASE_DEFAULTS, NORMS, L, specs
from surgery.families.moe_layers import every_layer
from surgery.families.nesting import Nesting
from surgery.families.qwen3_next import DELTANET_CORE, GATED_ATTENTION, LINEAR, LINEAR_DEFAULTS

DELTANET = specs("attention", L + "linear_attn.", [
    ("linear_qkv", "in_proj_qkv.weight", ("linear_conv_dim", "hidden"), None, LINEAR),
    ("linear_z", "in_proj_z.weight", ("linear_value_dim", "hidden"), None, LINEAR),
    ("linear_b", "in_proj_b.weight", ("linear_v_heads", "hidden"), None, LINEAR),
    ("linear_a", "in_proj_a.weight", ("linear_v_heads", "hidden"), None, LINEAR),
] + DELTANET_CORE)

FAMILY = replace(
    qwen3_next.FAMILY, name="qwen3_5_moe_text", architecture="Qwen3_5MoeForCausalLM",
    attention=GATED_ATTENTION + DELTANET + NORMS,
    dense_ffn=(),
    defaults={**BASE_DEFAULTS, **LINEAR_DEFAULTS},
    sparse_layers=every_layer,
    top_k_norm=None,
    dense_form="every layer of its config is MoE, and transformers' dense Qwen3.5 (Qwen3_5ForCausalLM) is no family "
               "here",
)

# Qwen3.5 MoE on the hub: Qwen3_5MoeForConditionalGeneration around this text model
NESTING = Nesting("Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe", "qwen3_5_moe_text",
                  renames=(("model.language_model.", "model."),), carried=("model.visual.",))
