"""Mixtral (MixtralForCausalLM), MoE: Mistral's attention, every layer MoE.

Per-expert weights are saved under ``block_sparse_moe`` as w1 (gate), w3 (up), w2 (down); in the
fused layout (and in memory) the router is ``mlp.gate``. The expert size is the config's
``intermediate_size``, since no layer keeps a dense FFN. ``sliding_window`` (none where absent)
applies to every layer.
"""

from surgery.families import mistral
from surgery.families.base import FUSED_EXPERTS, Family, L, Spec, per_expert
from surgery.families.sliding import SlidingWindow

FAMILY = Family(
    "mixtral", "MixtralForCausalLM", "moe", mistral.FAMILY.attention,
    dense_ffn=(),
    router=Spec("router", "router", L + "block_sparse_moe.gate.weight", ("experts", "hidden")),
    fused_router=Spec("router", "router", L + "mlp.gate.weight", ("experts", "hidden")),
    experts=per_expert("block_sparse_moe.", "w1", "w3", "w2"),
    fused_experts=FUSED_EXPERTS,
    defaults=mistral.FAMILY.defaults,
    moe_keys={"experts": ("num_local_experts",), "top_k": ("num_experts_per_tok",),
              "expert_ffn": ("intermediate_size",)},
    target_settings={"router_aux_loss_coef": 0.001, "output_router_logits": False, "router_jitter_noise": 0.0},
    mergekit_names=("mixtral",),
    sliding=SlidingWindow(defaults={"sliding_window": None}),
)
