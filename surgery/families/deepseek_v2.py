"""DeepSeek-V2 (DeepseekV2ForCausalLM): DeepSeek-V2 / V2-Lite / V2.5. MoE.

DeepSeek-V3's tensors (MLA attention, ``first_k_dense_replace`` dense layers, ``mlp.shared_experts``) without the
score-correction bias and without MTP layers. The router takes the softmax over all experts; with ``topk_method``
``group_limited_greedy`` a token first picks the ``topk_group`` of ``n_group`` groups with the best single score
(V2 and V2.5; V2-Lite routes greedily), so pruning then keeps the same number of experts in every group. The
weights are not renormalised, and are scaled by ``routed_scaling_factor``.
"""

from dataclasses import replace

from surgery.families import deepseek_v3
from surgery.families.base import BASE_DEFAULTS

FAMILY = replace(
    deepseek_v3.FAMILY, name="deepseek_v2", architecture="DeepseekV2ForCausalLM",
    router_tensors=(),
    defaults={**BASE_DEFAULTS, "first_k_dense_replace": 0, "n_shared_experts": 2, "topk_method": "greedy",
              "norm_topk_prob": False, "routed_scaling_factor": 1.0},
    router_scoring="softmax",
    top_k_norm=None,  # transformers' router never renormalises, whatever norm_topk_prob says
    top_k_renormalised=False,
    group_when=("topk_method", "group_limited_greedy"),
    group_min_experts=1,
    mtp_prefixes=None,
    mtp_off={},
)
