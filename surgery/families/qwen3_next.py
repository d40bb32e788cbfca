"""Qwen3-Next (Qwen3NextForCausalLM): Qwen3-Next-80B-A3B. MoE, hybrid attention.

Layers are of two kinds (``layer_types``; absent, every ``full_attention_interval``-th layer attends fully, the
others are linear, as transformers' config derives it). A ``linear_attention`` layer mixes tokens with a gated
DeltaNet (``linear_attn``: ``in_proj_qkvz`` / ``in_proj_ba`` projections, a depthwise causal ``conv1d`` over the
q/k/v channels, per-value-head ``dt_bias`` and ``A_log``, a gated RMSNorm over a value head, ``out_proj``); it returns
its output alone, not in a tuple. A ``full_attention`` layer's ``self_attn`` has a gated query (``q_proj`` twice as
wide: each head's query, then its output gate) and per-head q/k norms. RMSNorms scale by 1 + weight.

MoE layers (``mlp_only_layers`` / ``decoder_sparse_step`` say which, as Qwen2-MoE) route among ``num_experts``
(``mlp.experts.{e}``) with a softmax router ``mlp.gate`` whose top-k weights are renormalised (``norm_topk_prob``,
on by default) and add one shared expert gated by ``sigmoid(mlp.shared_expert_gate(x))``; the other layers keep a
dense ``mlp``. Hub checkpoints store ``mtp_num_hidden_layers`` multi-token-prediction layers under ``mtp.``, which
transformers ignores on load.
"""

from surgery.errors import SurgeryError
from surgery.families.base import (BASE_DEFAULTS, FUSED_EXPERTS, NORMS, QWEN_SPARSE_DEFAULTS, Family, L, Spec,
                                   per_expert, specs)
from surgery.families.dense_form import AllDense
from surgery.families.moe_layers import qwen_layers
from surgery.families.qwen2_moe import SHARED_EXPERT

FULL, LINEAR = "full_attention", "linear_attention"

# the gated full attention (q_proj: per head, the query then its gate), only in full-attention layers
GATED_ATTENTION = specs("attention", L + "self_attn.", [
    ("q", "q_proj.weight", ("2*q_dim", "hidden"), None, FULL),
    ("k", "k_proj.weight", ("kv_dim", "hidden"), None, FULL),
    ("v", "v_proj.weight", ("kv_dim", "hidden"), None, FULL),
    ("o", "o_proj.weight", ("hidden", "q_dim"), None, FULL),
    ("q_bias", "q_proj.bias", ("2*q_dim",), "attention_bias", FULL),
    ("k_bias", "k_proj.bias", ("kv_dim",), "attention_bias", FULL),
    ("v_bias", "v_proj.bias", ("kv_dim",), "attention_bias", FULL),
    ("o_bias", "o_proj.bias", ("hidden",), "attention_bias", FULL),
    ("q_norm", "q_norm.weight", ("head_dim",), None, FULL),
    ("k_norm", "k_norm.weight", ("head_dim",), None, FULL),
])

# the gated DeltaNet of Qwen3-Next, only in linear-attention layers (Qwen3.5 splits its input projections)
DELTANET_CORE = [
    ("conv", "conv1d.weight", ("linear_conv_dim", "1", "linear_kernel"), None, LINEAR),
    ("dt_bias", "dt_bias", ("linear_v_heads",), None, LINEAR),
    ("a_log", "A_log", ("linear_v_heads",), None, LINEAR),
    ("linear_norm", "norm.weight", ("linear_v_head_dim",), None, LINEAR),
    ("linear_out", "out_proj.weight", ("hidden", "linear_value_dim"), None, LINEAR),
]
DELTANET = specs("attention", L + "linear_attn.", [
    ("linear_qkvz", "in_proj_qkvz.weight", ("linear_qkvz", "hidden"), None, LINEAR),
    ("linear_ba", "in_proj_ba.weight", ("2*linear_v_heads", "hidden"), None, LINEAR),
] + DELTANET_CORE)

LINEAR_DEFAULTS = {"head_dim": 256, "full_attention_interval": 4, "linear_conv_kernel_dim": 4,
                   "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16,
                   "linear_num_value_heads": 32}


def layer_kind(config: dict, layer: int) -> str:
    """``layer_types[layer]``; without ``layer_types``, every ``full_attention_interval``-th layer attends fully."""
    kinds = config.get("layer_types")
    if kinds is None:
        interval = config.get("full_attention_interval") or LINEAR_DEFAULTS["full_attention_interval"]
        return LINEAR if (layer + 1) % interval else FULL
    if not isinstance(kinds, list) or len(kinds) != config.get("num_hidden_layers") or not set(kinds) <= {FULL, LINEAR}:
        raise SurgeryError(f"config.json: layer_types must list {FULL!r} or {LINEAR!r} for each of the "
                           f"{config.get('num_hidden_layers')} layers, found {kinds!r}")
    return kinds[layer]


def linear_dims(config: dict) -> dict:
    """The gated DeltaNet's sizes (its q/k/v/z projection: 2 key widths and 2 value widths), and the attention's
    head size (256 by default, not hidden / heads)."""
    key_dim = config["linear_num_key_heads"] * config["linear_key_head_dim"]
    value_dim = config["linear_num_value_heads"] * config["linear_value_head_dim"]
    head_dim = config["head_dim"]
    return {"linear_value_dim": value_dim, "linear_conv_dim": 2 * key_dim + value_dim,
            "linear_qkvz": 2 * key_dim + 2 * value_dim,
            "linear_v_heads": config["linear_num_value_heads"], "linear_v_head_dim": config["linear_value_head_dim"],
            "linear_kernel": config["linear_conv_kernel_dim"], "head_dim": head_dim,
            "q_dim": config["num_attention_heads"] * head_dim,
            "kv_dim": (config.get("num_key_value_heads") or config["num_attention_heads"]) * head_dim}


FAMILY = Family(
    "qwen3_next", "Qwen3NextForCausalLM", "moe", GATED_ATTENTION + DELTANET + NORMS,
    router=Spec("router", "router", L + "mlp.gate.weight", ("experts", "hidden")),
    experts=per_expert("mlp.", "gate_proj", "up_proj", "down_proj"),
    fused_experts=FUSED_EXPERTS,
    shared_expert=SHARED_EXPERT,
    defaults={**BASE_DEFAULTS, **QWEN_SPARSE_DEFAULTS, **LINEAR_DEFAULTS, "norm_topk_prob": True},
    moe_keys={"experts": ("num_experts",), "top_k": ("num_experts_per_tok",),
              "expert_ffn": ("moe_intermediate_size",), "shared_ffn": ("shared_expert_intermediate_size",)},
    derived_dims=linear_dims,
    layer_type=layer_kind,
    attention_modules={LINEAR: "linear_attn"},
    sparse_layers=qwen_layers,
    top_k_norm="norm_topk_prob",
    mtp_prefixes=lambda config: ["mtp."],
    mtp_off={"mtp_num_hidden_layers": 0},
    # no dense family has its hybrid layers: extract writes this family with every layer in ``mlp_only_layers``
    dense_form=AllDense(lambda config: {"mlp_only_layers": list(range(config["num_hidden_layers"]))}),
)
