"""gpt-oss (GptOssForCausalLM): gpt-oss-20b / 120b. MoE, every layer, experts stored fused only.

Attention with q/k/v/o biases and one learned sink logit per head (``self_attn.sinks``), sliding and full layers
alternating (``layer_types``; transformers builds the masks). The router (``mlp.router``) has a bias; it takes the
softmax of the top-k logits. Each layer's experts are four fused tensors, input-major unlike Mixtral's:
``gate_up_proj`` [E, H, 2I] with gate and up *interleaved* along the last axis (gate = ``[..., ::2]``),
``gate_up_proj_bias`` [E, 2I], ``down_proj`` [E, I, H], ``down_proj_bias`` [E, H]; the activation is a clamped
SwiGLU (``swiglu_limit``, ``swiglu_alpha``). There is no per-expert layout: an expert is its slice along the first
axis of each of the four tensors, which is what pruning copies (``fused_parts``: each fused tensor is one role).
Hub weights are MXFP4 (``*_blocks`` / ``*_scales``); this module reads the bf16 layout transformers saves.
"""

from surgery.families.base import BASE_DEFAULTS, NORMS, QKVO, Family, L, Spec, qkv_bias, specs

EXPERTS = "mlp.experts."

FAMILY = Family(
    "gpt_oss", "GptOssForCausalLM", "moe",
    specs("attention", L, QKVO + qkv_bias("attention_bias")
          + [("o_bias", "self_attn.o_proj.bias", ("hidden",), "attention_bias"),
             ("sinks", "self_attn.sinks", ("heads",))]) + NORMS,
    dense_ffn=(),
    router=Spec("router", "router", L + "mlp.router.weight", ("experts", "hidden")),
    router_tensors=(Spec("router_bias", "router", L + "mlp.router.bias", ("experts",)),),
    experts=specs("experts", L + EXPERTS + "{expert}.", [  # roles only: an expert's slice of each fused tensor
        ("gate_up", "gate_up_proj", ("hidden", "2*expert_ffn")),
        ("gate_up_bias", "gate_up_proj_bias", ("1", "2*expert_ffn")),
        ("down", "down_proj", ("expert_ffn", "hidden")),
        ("down_bias", "down_proj_bias", ("1", "hidden")),
    ]),
    fused_experts=specs("experts", L + EXPERTS, [
        ("gate_up", "gate_up_proj", ("experts", "hidden", "2*expert_ffn")),
        ("gate_up_bias", "gate_up_proj_bias", ("experts", "2*expert_ffn")),
        ("down", "down_proj", ("experts", "expert_ffn", "hidden")),
        ("down_bias", "down_proj_bias", ("experts", "hidden")),
    ]),
    fused_parts={"gate_up": ("gate_up",), "gate_up_bias": ("gate_up_bias",), "down": ("down",),
                 "down_bias": ("down_bias",)},
    stored_layouts=("fused",),
    experts_input_major=True,
    experts_call="routed_rows",
    defaults={**BASE_DEFAULTS, "attention_bias": True},
    moe_keys={"experts": ("num_local_experts",), "top_k": ("num_experts_per_tok", "experts_per_token"),
              "expert_ffn": ("intermediate_size",)},
    dense_form="its experts' clamped SwiGLU with biases is no dense MLP of any family, and its config makes every "
               "layer MoE",
)
