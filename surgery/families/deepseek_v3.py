"""DeepSeek-V3 (DeepseekV3ForCausalLM): DeepSeek-V3/R1/V3.1, Kimi-K2, Moonlight. MoE.

Multi-head latent attention: the query through a low-rank ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj`` (or one
``q_proj`` where ``q_lora_rank`` is null), keys and values through ``kv_a_proj_with_mqa`` (the latent plus the
shared rotary key), ``kv_a_layernorm`` and ``kv_b_proj``. The first ``first_k_dense_replace`` layers keep a dense
``mlp``; the others route among ``n_routed_experts`` (``mlp.experts.{e}``) and add ``n_shared_experts`` always-on
experts stored as one ``mlp.shared_experts`` FFN of width ``moe_intermediate_size`` x ``n_shared_experts``.

The router (``mlp.gate``) scores with a sigmoid; its ``e_score_correction_bias`` [E] shifts the choice (not the
weights); experts form ``n_group`` groups, a group's score is the sum of its two best choice scores and a token
uses the ``topk_group`` best groups; the weights are renormalised (``norm_topk_prob``) and scaled by
``routed_scaling_factor``. Pruning therefore keeps the same number of experts in every group, at least two.

Hub checkpoints hold ``num_nextn_predict_layers`` multi-token-prediction layers after the last decoder layer
(``model.layers.61.*`` in DeepSeek-V3): transformers ignores them on load.
"""

from surgery.families.base import BASE_DEFAULTS, DENSE_FFN, FUSED_EXPERTS, NORMS, Family, L, Spec, per_expert, specs
from surgery.families.dense_form import AllDense
from surgery.families.moe_layers import after_first_k_dense

MLA = specs("attention", L + "self_attn.", [
    ("q", "q_proj.weight", ("heads*qk_head_dim", "hidden"), "not q_lora_rank"),
    ("q_a", "q_a_proj.weight", ("q_lora_rank", "hidden"), "q_lora_rank"),
    ("q_a_bias", "q_a_proj.bias", ("q_lora_rank",), "q_lora_rank and attention_bias"),
    ("q_a_norm", "q_a_layernorm.weight", ("q_lora_rank",), "q_lora_rank"),
    ("q_b", "q_b_proj.weight", ("heads*qk_head_dim", "q_lora_rank"), "q_lora_rank"),
    ("kv_a", "kv_a_proj_with_mqa.weight", ("kv_a_dim", "hidden")),
    ("kv_a_bias", "kv_a_proj_with_mqa.bias", ("kv_a_dim",), "attention_bias"),
    ("kv_a_norm", "kv_a_layernorm.weight", ("kv_lora_rank",)),
    ("kv_b", "kv_b_proj.weight", ("heads*kv_b_head_dim", "kv_lora_rank")),
    ("o", "o_proj.weight", ("hidden", "heads*v_head_dim")),
    ("o_bias", "o_proj.bias", ("hidden",), "attention_bias"),
]) + NORMS

SHARED_EXPERTS = specs("shared_expert", L + "mlp.shared_experts.", [
    ("gate", "gate_proj.weight", ("shared_ffn", "hidden")),
    ("up", "up_proj.weight", ("shared_ffn", "hidden")),
    ("down", "down_proj.weight", ("hidden", "shared_ffn")),
])


def mla_dims(config: dict) -> dict:
    """MLA's sizes, and the shared experts' width (n_shared_experts x moe_intermediate_size)."""
    rope, nope, value = config["qk_rope_head_dim"], config["qk_nope_head_dim"], config["v_head_dim"]
    dims = {"qk_head_dim": rope + nope, "kv_b_head_dim": nope + value, "v_head_dim": value,
            "kv_lora_rank": config["kv_lora_rank"], "kv_a_dim": config["kv_lora_rank"] + rope,
            "shared_ffn": (config.get("n_shared_experts") or 0) * config["moe_intermediate_size"]}
    if config.get("q_lora_rank"):
        dims["q_lora_rank"] = config["q_lora_rank"]
    return dims



def mtp_layers(config: dict) -> list[str]:
    """The multi-token-prediction layers' prefixes: the layers after the last decoder layer."""
    first = config["num_hidden_layers"]
    return [f"model.layers.{first + index}." for index in range(config.get("num_nextn_predict_layers") or 0)]


FAMILY = Family(
    "deepseek_v3", "DeepseekV3ForCausalLM", "moe", MLA,
    dense_ffn=DENSE_FFN,
    router=Spec("router", "router", L + "mlp.gate.weight", ("experts", "hidden")),
    router_tensors=(Spec("correction_bias", "router", L + "mlp.gate.e_score_correction_bias", ("experts",)),),
    experts=per_expert("mlp.", "gate_proj", "up_proj", "down_proj"),
    fused_experts=FUSED_EXPERTS,
    shared_expert=SHARED_EXPERTS,
    shared_scale=1.0,
    defaults={**BASE_DEFAULTS, "first_k_dense_replace": 3, "n_shared_experts": 1, "n_group": 8, "topk_group": 4,
              "norm_topk_prob": True, "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1,
              },
    moe_keys={"experts": ("n_routed_experts",), "top_k": ("num_experts_per_tok",),
              "expert_ffn": ("moe_intermediate_size",)},
    derived_dims=mla_dims,
    sparse_layers=after_first_k_dense,
    top_k_norm="norm_topk_prob",
    router_scoring="sigmoid",
    group_keys=("n_group", "topk_group"),
    group_min_experts=2,
    mtp_prefixes=mtp_layers,
    mtp_off={"num_nextn_predict_layers": 0},
    # transformers has no dense MLA family: extract writes this one with every layer dense (so do GLM-4.5, V2)
    dense_form=AllDense(lambda config: {"first_k_dense_replace": config["num_hidden_layers"]},
                        routed_scale="routed_scaling_factor"),
)
