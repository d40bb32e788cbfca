"""ERNIE 4.5 MoE (Ernie4_5_MoeForCausalLM): ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B. MoE.

Llama-style attention and FFNs, with biases on every projection where ``use_bias``; tied embeddings by default.
MoE layers are every ``moe_layer_interval``-th layer from ``moe_layer_start_index`` to ``moe_layer_end_index``;
the others keep a dense ``mlp``. An MoE layer routes among ``moe_num_experts`` experts (``moe_k`` per token) with
a softmax router whose choice is shifted by a score-correction bias, stored as
``mlp.moe_statics.e_score_correction_bias`` [1, E] (``mlp.gate.moe_statics...`` in memory), and adds
``moe_num_shared_experts`` shared experts as one ``mlp.shared_experts`` FFN. Hub checkpoints may hold MTP
weights (``mtp_*``) that transformers ignores on load.
"""

from surgery.families.base import BASE_DEFAULTS, FUSED_EXPERTS, NORMS, QKVO, Family, L, Spec, per_expert, specs
from surgery.families.dense_form import AllDense
from surgery.families.moe_layers import moe_interval

BIASES = [("q_bias", "self_attn.q_proj.bias", ("q_dim",), "use_bias"),
          ("k_bias", "self_attn.k_proj.bias", ("kv_dim",), "use_bias"),
          ("v_bias", "self_attn.v_proj.bias", ("kv_dim",), "use_bias"),
          ("o_bias", "self_attn.o_proj.bias", ("hidden",), "use_bias")]


def shared_width(config: dict) -> dict:
    return {"shared_ffn": (config.get("moe_num_shared_experts") or 0) * config["moe_intermediate_size"]}


FAMILY = Family(
    "ernie4_5_moe", "Ernie4_5_MoeForCausalLM", "moe",
    specs("attention", L, QKVO + BIASES) + NORMS,
    dense_ffn=specs("ffn", L, [
        ("gate", "mlp.gate_proj.weight", ("ffn", "hidden")), ("up", "mlp.up_proj.weight", ("ffn", "hidden")),
        ("down", "mlp.down_proj.weight", ("hidden", "ffn")),
        ("gate_bias", "mlp.gate_proj.bias", ("ffn",), "use_bias"), ("up_bias", "mlp.up_proj.bias", ("ffn",), "use_bias"),
        ("down_bias", "mlp.down_proj.bias", ("hidden",), "use_bias")]),
    router=Spec("router", "router", L + "mlp.gate.weight", ("experts", "hidden")),
    router_tensors=(Spec("correction_bias", "router", L + "mlp.moe_statics.e_score_correction_bias", ("1", "experts")),),
    fused_router_tensors=(Spec("correction_bias", "router", L + "mlp.gate.moe_statics.e_score_correction_bias",
                               ("1", "experts")),),
    experts=per_expert("mlp.", "gate_proj", "up_proj", "down_proj"),
    fused_experts=FUSED_EXPERTS,
    shared_expert=specs("shared_expert", L + "mlp.shared_experts.", [
        ("gate", "gate_proj.weight", ("shared_ffn", "hidden")), ("up", "up_proj.weight", ("shared_ffn", "hidden")),
        ("down", "down_proj.weight", ("hidden", "shared_ffn")),
        ("gate_bias", "gate_proj.bias", ("shared_ffn",), "use_bias"), ("up_bias", "up_proj.bias", ("shared_ffn",), "use_bias"),
        ("down_bias", "down_proj.bias", ("hidden",), "use_bias")]),
    global_tensors=(Spec("lm_head_bias", "head", "lm_head.bias", ("vocab",), "use_bias"),),
    shared_scale=1.0,
    defaults={**BASE_DEFAULTS, "tie_word_embeddings": True, "use_bias": False, "moe_num_shared_experts": 2,
              "moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1},
    moe_keys={"experts": ("moe_num_experts",), "top_k": ("moe_k",), "expert_ffn": ("moe_intermediate_size",)},
    derived_dims=shared_width,
    sparse_layers=moe_interval,
    top_k_norm=None,
    mtp_prefixes=lambda config: ["mtp"],
    mtp_off={"num_nextn_predict_layers": 0},
    # Ernie4_5ForCausalLM has these tensors but no lm_head bias (use_bias), and no dense family converts into this
    # one: extract writes this family with no MoE layer (the first one past the last layer)
    dense_form=AllDense(lambda config: {"moe_layer_start_index": config["num_hidden_layers"]}),
)
