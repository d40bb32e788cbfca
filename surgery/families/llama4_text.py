"""Llama 4, text (Llama4ForCausalLM, ``model_type`` ``llama4_text``): Llama-4-Scout / Maverick's language model. MoE.

A decoder layer's FFN is ``feed_forward``: an MoE block in the layers ``moe_layers`` lists (or, where it is absent,
every ``interleave_moe_layer_step``-th layer: Scout every layer, Maverick every other), elsewhere a dense MLP of width
``intermediate_size_mlp``. The MoE block has a router (``feed_forward.router``: sigmoid of the top-k logits, never
renormalised, returning (scores, logits) rather than transformers 5's usual triple), one always-on
``shared_expert`` of the experts' width, and experts stored fused only, input-major: ``experts.gate_up_proj``
[E, H, 2I] (each expert's gate columns, then its up columns) and ``experts.down_proj`` [E, I, H]. The router's
score multiplies an expert's *input*, not its output, and every expert runs on every token (a token it did not
choose arrives as zeros). An expert is its slice along the first axis of the two fused tensors, which is what
pruning copies (``fused_parts``). Attention has no bias and no norm weights (its q/k norm is weightless); layers
without rotary embeddings (``no_rope_layers``) and chunked attention (``attention_chunk_size``) are transformers'
own.

Hub checkpoints are the multimodal Llama4ForConditionalGeneration (``model_type`` ``llama4``): this text config
nested under ``text_config``, these tensors under ``language_model.``, the vision tower and projector beside them.
``NESTING`` says so: surgery reads the text model inside and carries the vision tensors as bytes.
"""

from surgery.families.base import BASE_DEFAULTS, NORMS, O_BIAS, QKVO, Family, L, Spec, qkv_bias, specs
from surgery.families.dense_form import AllDense
from surgery.families.moe_layers import listed_or_interleaved
from surgery.families.nesting import Nesting

FFN = "feed_forward."


def attention_kind(config: dict, layer: int) -> str:
    """``layer_types[layer]``; without it, as transformers derives it: the layers with rotary embeddings (all but
    every ``no_rope_layer_interval``-th, unless ``no_rope_layers`` lists them) attend in chunks of
    ``attention_chunk_size``, the others fully."""
    kinds = config.get("layer_types")
    if kinds:
        return kinds[layer]
    interval = config.get("no_rope_layer_interval") or 4
    rope = config.get("no_rope_layers") or [int((index + 1) % interval != 0)
                                             for index in range(config["num_hidden_layers"])]
    chunked = rope[layer] and config.get("attention_chunk_size", 8192) is not None
    return "chunked_attention" if chunked else "full_attention"


FAMILY = Family(
    "llama4_text", "Llama4ForCausalLM", "moe",
    specs("attention", L, QKVO + qkv_bias("attention_bias") + O_BIAS) + NORMS,
    dense_ffn=specs("ffn", L + FFN, [
        ("gate", "gate_proj.weight", ("ffn", "hidden")),
        ("up", "up_proj.weight", ("ffn", "hidden")),
        ("down", "down_proj.weight", ("hidden", "ffn")),
    ]),
    router=Spec("router", "router", L + FFN + "router.weight", ("experts", "hidden")),
    experts=specs("experts", L + FFN + "experts.{expert}.", [  # roles only: an expert's slice of each fused tensor
        ("gate_up", "gate_up_proj", ("hidden", "2*expert_ffn")),
        ("down", "down_proj", ("expert_ffn", "hidden")),
    ]),
    fused_experts=specs("experts", L + FFN + "experts.", [
        ("gate_up", "gate_up_proj", ("experts", "hidden", "2*expert_ffn")),
        ("down", "down_proj", ("experts", "expert_ffn", "hidden")),
    ]),
    fused_parts={"gate_up": ("gate_up",), "down": ("down",)},
    stored_layouts=("fused",),
    shared_expert=specs("shared_expert", L + FFN + "shared_expert.", [
        ("gate", "gate_proj.weight", ("shared_ffn", "hidden")),
        ("up", "up_proj.weight", ("shared_ffn", "hidden")),
        ("down", "down_proj.weight", ("hidden", "shared_ffn")),
    ]),
    shared_scale=1.0,
    router_input="feed_forward",
    router_outputs=("scores", "logits"),
    experts_call="scaled",
    experts_input_major=True,
    router_scoring="sigmoid",
    top_k_renormalised=False,
    defaults={**BASE_DEFAULTS, "interleave_moe_layer_step": 1, "intermediate_size_mlp": 16384},
    moe_keys={"experts": ("num_local_experts",), "top_k": ("num_experts_per_tok",),
              "expert_ffn": ("intermediate_size",), "shared_ffn": ("intermediate_size",)},
    # the dense layers' width is intermediate_size_mlp; intermediate_size is the experts'
    derived_dims=lambda config: {"ffn": config["intermediate_size_mlp"]},
    sparse_layers=listed_or_interleaved,
    layer_type=attention_kind,
    # every layer dense: an empty moe_layers; the dense width is intermediate_size_mlp; an expert's gate and up are
    # the two column halves of its gate_up [H, 2I], transposed, its down its down_proj [I, H] transposed
    dense_form=AllDense(lambda config: {"moe_layers": []}, width_key="intermediate_size_mlp",
                        expert_roles={"gate": ("gate_up", 0, 2), "up": ("gate_up", 1, 2), "down": ("down", 0, 1)}),
)

# Llama-4-Scout / Maverick on the hub: Llama4ForConditionalGeneration around this text model
NESTING = Nesting("Llama4ForConditionalGeneration", "llama4", "llama4_text",
                  renames=(("language_model.", ""),), carried=("vision_model.", "multi_modal_projector."))
