"""GraniteMoeShared (GraniteMoeSharedForCausalLM), MoE: GraniteMoE plus an optional shared expert without a gate.

The routed experts, router and attention are GraniteMoE's. ``shared_intermediate_size`` > 0 adds
``shared_mlp.input_linear.weight`` [2S, H] (the shared expert's gate rows, then its up rows: one
stored tensor, written as the two roles back to back) and ``shared_mlp.output_linear.weight``
[H, S]; its output is added whole (no gate, ``shared_scale`` 1), so `upcycle --shared-expert`
scales its down_proj by 1/2 and the routed experts' by 1/2. With 0 there is no shared expert at
all (``shared_required`` False: a merge or a split with nothing to share writes none).
"""

from dataclasses import replace

from surgery.families import granitemoe
from surgery.families.base import FusedSource, L, specs

FAMILY = replace(
    granitemoe.FAMILY, name="granitemoeshared", architecture="GraniteMoeSharedForCausalLM",
    shared_expert=specs("shared_expert", L + "shared_mlp.", [
        ("gate", "gate.weight", ("shared_ffn", "hidden")),  # roles only: stored fused in input_linear
        ("up", "up.weight", ("shared_ffn", "hidden")),
        ("down", "output_linear.weight", ("hidden", "shared_ffn")),
    ]),
    fused_sources=(FusedSource("shared_expert", L + "shared_mlp.input_linear.weight", ("gate", "up")),),
    moe_keys={**granitemoe.FAMILY.moe_keys, "shared_ffn": ("shared_intermediate_size",)},
    shared_scale=1.0,
    shared_required=False,
    extra_ffn_modules=("shared_mlp",),  # added beside block_sparse_moe, not inside it
)
