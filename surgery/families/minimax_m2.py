"""MiniMax-M2 (MiniMaxM2ForCausalLM). MoE, every layer.

Mixtral's stored names (``block_sparse_moe.gate``, ``experts.{e}.w1/w3/w2``; ``mlp.*`` in the fused layout and
in memory) with q/k RMSNorms over the whole projections and a sigmoid router: ``e_score_correction_bias`` [E]
(``block_sparse_moe.e_score_correction_bias``) shifts the choice of the top-k, the weights are the uncorrected
sigmoid scores renormalised. Pruning slices the bias with the experts.
"""

from surgery.families.base import BASE_DEFAULTS, FUSED_EXPERTS, NORMS, QKVO, Family, L, Spec, per_expert, specs

MOE = "block_sparse_moe."

FAMILY = Family(
    "minimax_m2", "MiniMaxM2ForCausalLM", "moe",
    specs("attention", L, QKVO + [("q_norm", "self_attn.q_norm.weight", ("q_dim",)),
                                  ("k_norm", "self_attn.k_norm.weight", ("kv_dim",))]) + NORMS,
    dense_ffn=(),
    router=Spec("router", "router", L + MOE + "gate.weight", ("experts", "hidden")),
    fused_router=Spec("router", "router", L + "mlp.gate.weight", ("experts", "hidden")),
    router_tensors=(Spec("correction_bias", "router", L + MOE + "e_score_correction_bias", ("experts",)),),
    fused_router_tensors=(Spec("correction_bias", "router", L + "mlp.e_score_correction_bias", ("experts",)),),
    experts=per_expert(MOE, "w1", "w3", "w2"),
    fused_experts=FUSED_EXPERTS,
    defaults=BASE_DEFAULTS,
    router_scoring="sigmoid",  # its top-k weights are always renormalised (no switch: top_k_norm None)
    moe_keys={"experts": ("num_local_experts",), "top_k": ("num_experts_per_tok",),
              "expert_ffn": ("intermediate_size",)},
    dense_form="no dense family has its attention: pre-norm with q/k RMSNorms over the whole projections, and its "
               "config makes every layer MoE",
)
