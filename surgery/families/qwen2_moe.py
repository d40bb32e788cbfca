"""Qwen2-MoE (Qwen2MoeForCausalLM): Qwen2's attention, a shared expert with a sigmoid gate beside
the routed experts, and dense layers where ``mlp_only_layers`` / ``decoder_sparse_step`` say.

mergekit-moe calls this format ``Qwen MoE`` (``architecture: qwen`` names it, and Qwen3 MoE).

Sliding window: with ``use_sliding_window`` on, the layers ``layer_types`` marks slide; absent, the
even layers below ``max_window_layers`` (transformers' Qwen2MoeConfig). Off, the window is 0. Its
attention applies the window through the mask only: transformers' flash-attention path does not
receive it (as of 5.24), unlike Qwen2's.
"""

from surgery.families import qwen2
from surgery.families.base import FUSED_EXPERTS, QWEN_SPARSE_DEFAULTS, Family, L, Spec, per_expert, specs
from surgery.families.moe_layers import qwen_layers
from surgery.families.sliding import SlidingWindow

SHARED_EXPERT = specs("shared_expert", L + "mlp.", [
    ("gate", "shared_expert.gate_proj.weight", ("shared_ffn", "hidden")),
    ("up", "shared_expert.up_proj.weight", ("shared_ffn", "hidden")),
    ("down", "shared_expert.down_proj.weight", ("hidden", "shared_ffn")),
    ("shared_gate", "shared_expert_gate.weight", ("1", "hidden")),
])

FAMILY = Family(
    "qwen2_moe", "Qwen2MoeForCausalLM", "moe", qwen2.FAMILY.attention,
    router=Spec("router", "router", L + "mlp.gate.weight", ("experts", "hidden")),
    experts=per_expert("mlp.", "gate_proj", "up_proj", "down_proj"),
    fused_experts=FUSED_EXPERTS,
    shared_expert=SHARED_EXPERT,
    defaults={**qwen2.FAMILY.defaults, **QWEN_SPARSE_DEFAULTS},
    moe_keys={"experts": ("num_experts",), "top_k": ("num_experts_per_tok",),
              "expert_ffn": ("moe_intermediate_size",), "shared_ffn": ("shared_expert_intermediate_size",)},
    sparse_layers=qwen_layers,
    top_k_norm="norm_topk_prob",
    target_settings={"norm_topk_prob": True, "router_aux_loss_coef": 0.001, "output_router_logits": False},
    mergekit_names=("qwen moe",),
    sliding=SlidingWindow(
        defaults={"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28},
        switch="use_sliding_window", off_value=0, per_layer=True, derived_from=("max_window_layers",),
        derive=lambda layer, s: layer % 2 == 0 and layer < s["max_window_layers"] and bool(s["use_sliding_window"])),
)
