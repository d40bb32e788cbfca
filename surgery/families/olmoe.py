"""OLMoE (OlmoeForCausalLM): OLMoE-1B-7B. MoE, every layer.

Pre-norm Llama-style attention with q/k RMSNorms over the whole projections (``q_norm`` [q_dim], ``k_norm``
[kv_dim]), optional q/k/v/o biases (``attention_bias``). The router (``mlp.gate``) takes the softmax over all 64
experts and keeps the top 8 without renormalising them (``norm_topk_prob`` false by default); experts are stored
per expert as ``mlp.experts.{e}.gate_proj/up_proj/down_proj`` of width ``intermediate_size``.
"""

from surgery.families.base import (BASE_DEFAULTS, FUSED_EXPERTS, NORMS, O_BIAS, QKVO, Family, L, Spec, per_expert,
                                   qkv_bias, specs)
from surgery.families.olmo2 import QK_NORM_FULL  # q/k norms over the whole projections, as OLMo 2's

FAMILY = Family(
    "olmoe", "OlmoeForCausalLM", "moe",
    specs("attention", L, QKVO + qkv_bias("attention_bias") + O_BIAS + QK_NORM_FULL) + NORMS,
    dense_ffn=(),
    router=Spec("router", "router", L + "mlp.gate.weight", ("experts", "hidden")),
    experts=per_expert("mlp.", "gate_proj", "up_proj", "down_proj"),
    fused_experts=FUSED_EXPERTS,
    defaults={**BASE_DEFAULTS, "norm_topk_prob": False},
    moe_keys={"experts": ("num_experts",), "top_k": ("num_experts_per_tok",), "expert_ffn": ("intermediate_size",)},
    top_k_norm="norm_topk_prob",
    dense_form="no dense family has its attention: pre-norm with q/k norms over the whole projections (OLMo's norms "
               "have no weights, OLMo 2's and OLMo 3's follow each block), and its config makes every layer MoE",
)
