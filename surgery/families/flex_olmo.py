"""FlexOlmo (FlexOlmoForCausalLM), MoE: OLMo 2's post-norm attention and norms, every layer MoE.

The MoE block (``mlp``) reads the post-attention residual stream, not a norm output, and so does its
router (``mlp.gate``). Experts are saved per expert as ``mlp.experts.{e}.gate_proj/up_proj/down_proj``
(transformers maps them to the fused layout on load). The expert size is the config's
``intermediate_size``, since no layer keeps a dense FFN; the expert count is ``num_experts``
(``num_local_experts`` is transformers' alias for it). ``norm_topk_prob`` is off by default in
FlexOlmo; an MoE result sets it, so the top-k weights sum to 1 and copies of one FFN are exact.
"""

from surgery.families import olmo2
from surgery.families.base import FUSED_EXPERTS, Family, L, Spec, per_expert

FAMILY = Family(
    "flex_olmo", "FlexOlmoForCausalLM", "moe", olmo2.FAMILY.attention,
    dense_ffn=(),
    router=Spec("router", "router", L + "mlp.gate.weight", ("experts", "hidden")),
    experts=per_expert("mlp.", "gate_proj", "up_proj", "down_proj"),
    fused_experts=FUSED_EXPERTS,
    defaults={**olmo2.FAMILY.defaults, "rms_norm_eps": 1e-6},
    moe_keys={"experts": ("num_experts", "num_local_experts"), "top_k": ("num_experts_per_tok",),
              "expert_ffn": ("intermediate_size",)},
    router_input="mlp",
    top_k_norm="norm_topk_prob",
    target_settings={"norm_topk_prob": True, "router_aux_loss_coef": 0.01, "output_router_logits": False},
)
