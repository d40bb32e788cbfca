"""Phi-3.5-MoE (PhimoeForCausalLM). MoE, every layer.

Mixtral's stored names (``block_sparse_moe.gate``, ``experts.{e}.w1/w3/w2``) with LayerNorms that have biases
(``input_layernorm``, ``post_attention_layernorm``, ``model.norm``), q/k/v/o biases where ``attention_bias``, and
an ``lm_head.bias`` where ``lm_head_bias``. transformers holds the router as ``mlp.router`` (the fused layout's
name). Routing is SparseMixer: top-2 by successive masked softmaxes over the router logits; transformers' router
returns the weights and experts it chose, which is what scoring reads.
"""

from surgery.families import mixtral
from surgery.families.base import (BASE_DEFAULTS, FUSED_EXPERTS, O_BIAS, QKVO, Family, L, Spec, per_expert, qkv_bias,
                                   specs)

NORMS_WITH_BIAS = specs("norm", L, [
    ("input_norm", "input_layernorm.weight", ("hidden",)),
    ("input_norm_bias", "input_layernorm.bias", ("hidden",)),
    ("post_attention_norm", "post_attention_layernorm.weight", ("hidden",)),
    ("post_attention_norm_bias", "post_attention_layernorm.bias", ("hidden",)),
])

FAMILY = Family(
    "phimoe", "PhimoeForCausalLM", "moe",
    specs("attention", L, QKVO + qkv_bias("attention_bias") + O_BIAS) + NORMS_WITH_BIAS,
    dense_ffn=(),
    router=mixtral.FAMILY.router,
    fused_router=Spec("router", "router", L + "mlp.router.weight", ("experts", "hidden")),
    experts=per_expert("block_sparse_moe.", "w1", "w3", "w2"),
    fused_experts=FUSED_EXPERTS,
    global_tensors=(Spec("final_norm_bias", "norm", "model.norm.bias", ("hidden",)),
                    Spec("lm_head_bias", "head", "lm_head.bias", ("vocab",), "lm_head_bias")),
    defaults={**BASE_DEFAULTS, "lm_head_bias": False},
    moe_keys={"experts": ("num_local_experts",), "top_k": ("num_experts_per_tok",),
              "expert_ffn": ("intermediate_size",)},
    dense_form="no dense family has its LayerNorms with biases around biased attention and a biased lm_head, and "
               "its config makes every layer MoE",
)
