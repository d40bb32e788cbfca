"""GraniteMoE (GraniteMoeForCausalLM), MoE: Granite's attention, every layer MoE, experts stored fused only.

A checkpoint holds each layer's experts as ``block_sparse_moe.input_linear.weight`` [E, 2I, H] (each
expert's gate rows, then its up rows) and ``output_linear.weight`` [E, H, I], and the router as
``block_sparse_moe.router.layer.weight``; transformers' module holds the same values as
``experts.gate_up_proj`` / ``experts.down_proj`` / ``router.weight`` (``memory_names``). There is no
per-expert layout: plans name per-expert roles (never written) and are always written fused. The
router takes the softmax of the top-k logits, i.e. renormalised top-k weights, so identical experts
reproduce the dense FFN.
"""

from surgery.families import granite
from surgery.families.base import Family, L, Spec, specs

MOE = "block_sparse_moe."

FAMILY = Family(
    "granitemoe", "GraniteMoeForCausalLM", "moe", granite.FAMILY.attention,
    dense_ffn=(),
    router=Spec("router", "router", L + MOE + "router.layer.weight", ("experts", "hidden")),
    experts=specs("experts", L + MOE + "experts.{expert}.", [  # roles only: never stored per expert
        ("gate", "gate_proj.weight", ("expert_ffn", "hidden")),
        ("up", "up_proj.weight", ("expert_ffn", "hidden")),
        ("down", "down_proj.weight", ("hidden", "expert_ffn")),
    ]),
    fused_experts=specs("experts", L + MOE, [
        ("gate_up", "input_linear.weight", ("experts", "2*expert_ffn", "hidden")),
        ("down", "output_linear.weight", ("experts", "hidden", "expert_ffn")),
    ]),
    stored_layouts=("fused",),
    memory_names={MOE + "input_linear.weight": MOE + "experts.gate_up_proj",
                  MOE + "output_linear.weight": MOE + "experts.down_proj",
                  MOE + "router.layer.weight": MOE + "router.weight"},
    router_input="block_sparse_moe",
    defaults=granite.FAMILY.defaults,
    moe_keys={"experts": ("num_local_experts",), "top_k": ("num_experts_per_tok",),
              "expert_ffn": ("intermediate_size",)},
    target_settings={"router_aux_loss_coef": 0.001, "output_router_logits": False},
)
