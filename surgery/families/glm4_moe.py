"""GLM-4.5 / 4.6 / 4.7 and GLM-4.5-Air (Glm4MoeForCausalLM). MoE.

Grouped-query attention with q/k/v biases (``attention_bias``), optional q/k norms (``use_qk_norm``) and partial
rotary (transformers applies it: nothing to store). The MoE half is DeepSeek-V3's: ``first_k_dense_replace``
dense layers, ``mlp.shared_experts`` (width ``moe_intermediate_size`` x ``n_shared_experts``), a sigmoid router
with ``e_score_correction_bias``, group-limited choice (``n_group``, ``topk_group``; a group's score sums its two
best), renormalised weights scaled by ``routed_scaling_factor``. Hub checkpoints hold
``num_nextn_predict_layers`` MTP layers after the last decoder layer (``model.layers.46.*`` in GLM-4.5-Air).
"""

from dataclasses import replace

from surgery.families import deepseek_v3
from surgery.families.base import BASE_DEFAULTS, NORMS, QK_NORM, QKVO, L, qkv_bias, specs


def shared_width(config: dict) -> dict:
    return {"shared_ffn": (config.get("n_shared_experts") or 0) * config["moe_intermediate_size"]}


FAMILY = replace(
    deepseek_v3.FAMILY, name="glm4_moe", architecture="Glm4MoeForCausalLM",
    attention=specs("attention", L, QKVO + qkv_bias("attention_bias")
                    + [(role, suffix, shape, "use_qk_norm") for role, suffix, shape in QK_NORM]) + NORMS,
    defaults={**BASE_DEFAULTS, "first_k_dense_replace": 1, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
              "norm_topk_prob": True, "routed_scaling_factor": 1.0, "use_qk_norm": False,
              "num_nextn_predict_layers": 1},
    derived_dims=shared_width,
)
