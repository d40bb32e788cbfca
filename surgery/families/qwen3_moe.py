"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3's attention, no shared expert, dense layers where
``mlp_only_layers`` / ``decoder_sparse_step`` say. The expert count is read from ``num_experts``, or
from ``num_local_experts`` where a config uses that key. mergekit-moe calls this format ``Qwen3 MoE``.

Sliding window: with ``use_sliding_window`` on, ``sliding_window`` applies to every layer; there is no
``layer_types`` and no ``max_window_layers`` (transformers' Qwen3MoeConfig).
"""

from surgery.families import qwen3
from surgery.families.base import FUSED_EXPERTS, QWEN_SPARSE_DEFAULTS, Family, L, Spec, per_expert
from surgery.families.moe_layers import qwen_layers
from surgery.families.sliding import SlidingWindow

FAMILY = Family(
    "qwen3_moe", "Qwen3MoeForCausalLM", "moe", qwen3.FAMILY.attention,
    router=Spec("router", "router", L + "mlp.gate.weight", ("experts", "hidden")),
    experts=per_expert("mlp.", "gate_proj", "up_proj", "down_proj"),
    fused_experts=FUSED_EXPERTS,
    defaults={**qwen3.FAMILY.defaults, **QWEN_SPARSE_DEFAULTS},
    moe_keys={"experts": ("num_experts", "num_local_experts"), "top_k": ("num_experts_per_tok",),
              "expert_ffn": ("moe_intermediate_size",)},
    sparse_layers=qwen_layers,
    top_k_norm="norm_topk_prob",
    target_settings={"norm_topk_prob": True, "router_aux_loss_coef": 0.001, "output_router_logits": False},
    mergekit_names=("qwen3 moe",),
    sliding=SlidingWindow(defaults={"use_sliding_window": False, "sliding_window": 4096}, switch="use_sliding_window"),
)
