"""The extract plan: every MoE layer's FFN made from its routed experts, in the MoE's dense form.

The dense form is the family's (``families.convert.extract_target``): the dense family the MoE family is made
from (Mixtral -> Mistral, Qwen2-MoE -> Qwen2, Qwen3-MoE -> Qwen3, FlexOlmo -> OLMo 2, GraniteMoE(Shared) ->
Granite), or the MoE family itself with every layer dense (DeepSeek-V3/V2, GLM-4.5, ERNIE 4.5: an ``AllDense``).
Per MoE layer the dense FFN is one expert's (byte copies) or the experts' weights averaged (``WeightedMean``), its
down_proj scaled by the routed scale (DeepSeek's ``routed_scaling_factor``) where the family has one; a shared
expert's neurons are appended (its down columns scaled by the share of its output the model adds) or left out.
Dense layers are copied, zero neurons appended where another layer's FFN is wider. Routers and multi-token-
prediction layers are left out; everything else is copied."""

from __future__ import annotations

import functools
import json

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.families.convert import all_dense_config, dense_config, routed_scale
from surgery.families.dense_form import AllDense
from surgery.io.checkpoint import Checkpoint
from surgery.plan.layouts import expert_parts
from surgery.plan.mean import WeightedMean
from surgery.plan.nodes import Apply, Concat, Copy, Init, PadRows, Recipe, Scale
from surgery.plan.plan import OutputTensor, Plan
from surgery.plan.sources import leave_out_mtp


def shared_rule(family, config: dict, options) -> str | None:
    """'fold', 'drop', or None where the source has no shared expert; a gated one needs --shared-gate."""
    if not family.shared_expert or not arch.dimensions(family, config).get("shared_ffn"):
        if options.shared_gate is not None:
            raise SurgeryError(f"--shared-gate {options.shared_gate}: the source has no shared expert")
        return None
    gated = any(spec.role == "shared_gate" for spec in family.shared_expert)
    if options.shared_gate is None and gated:
        raise SurgeryError(f"{family.architecture}'s shared expert is scaled by sigmoid(x . gate), which a dense FFN "
                           f"cannot compute: give --shared-gate fold (scale it by {family.shared_scale:g}, exact where "
                           f"the gate's weights are zero) or --shared-gate drop (leave it out)")
    return options.shared_gate or "fold"


# ------------------------------------------------------------------ the plan
def layer_weights(family, config: dict, options, frequencies) -> dict[int, list[float]]:
    """{MoE layer: the weight of each expert in its dense FFN} (one-hot for --expert)."""
    moe_layers = arch.moe_layers(family, config)
    experts = arch.dimensions(family, config)["experts"]
    if options.expert is not None:
        return {layer: [1.0 if e == options.expert else 0.0 for e in range(experts)]
                for layer in moe_layers}
    if options.average == "uniform":
        return {layer: [1.0] * experts for layer in moe_layers}
    return {layer: list(frequencies["layers"][layer]["frequency"]) for layer in moe_layers}


def dense_roles(family, pieces: dict) -> dict:
    """{(dense FFN role, layer, expert): recipe}: the experts' parts as the dense FFN stores them; experts stored
    input-major (``AllDense.expert_roles``) give each role as a block of columns transposed."""
    roles = family.dense_form.expert_roles if isinstance(family.dense_form, AllDense) else {}
    if not roles:
        return pieces
    out = {}
    for (role, layer, expert), piece in pieces.items():
        for dense, (stored, block, count) in roles.items():
            if stored == role:
                out[(dense, layer, expert)] = Apply([piece], functools.partial(_block_transposed, block=block,
                                                                               count=count),
                                                    f"transpose of column block {block + 1}/{count} of")
    return out


def _block_transposed(tensor, block: int, count: int):
    width = tensor.shape[-1] // count
    return tensor[..., block * width:(block + 1) * width].transpose(-1, -2).contiguous()


def _combined(pieces: dict, role: str, layer: int, weights: list[float]) -> Recipe:
    """One expert's piece (a byte copy) where a single weight is non-zero, else the weighted mean."""
    used = [(weight, pieces[(role, layer, expert)]) for expert, weight in enumerate(weights) if weight]
    if len(used) == 1:
        return used[0][1]
    return WeightedMean([recipe for _, recipe in used], [weight for weight, _ in used])


def _moe_ffn(source: Checkpoint, family, out_spec, layer: int, pieces: dict, views: dict, weights: list[float],
             shared: str | None, scale: float, dims: dict) -> Recipe:
    """One dense FFN tensor of an MoE layer: the routed part (one expert's, or the mean; its output side scaled by the
    routed scale) and the shared expert's neurons (folded: appended, its output side scaled by the share the model
    adds). A bias the routed experts lack is zero for their neurons (they add none); a tensor without a neuron axis
    (the down bias) is added to the output: the shared expert's, or zero."""
    role = out_spec.role
    axis = out_spec.shape.index("ffn") if "ffn" in out_spec.shape else None
    output_side = out_spec.shape[0] == "hidden"  # down_proj and its bias: what the FFN adds to the residual stream
    parts = []
    if (role, layer, 0) in pieces:
        part = _combined(pieces, role, layer, weights)
        parts.append(Scale(part, scale) if output_side and scale != 1.0 else part)
    elif axis is not None:
        parts.append(Init("zero", (dims["expert_ffn"],)))
    if shared == "fold" and any(spec.role == role for spec in family.shared_expert):
        name = family.spec("shared_expert", role).name(layer)
        part = Copy(source, *views[name]) if name in views else Copy(source, name)
        parts.append(Scale(part, family.shared_scale) if output_side and family.shared_scale != 1.0 else part)
    if axis is None:
        if len(parts) > 1:
            raise SurgeryError(f"{family.architecture}: the routed experts' {role} would have to be added to the shared "
                               f"expert's; extract does not compute sums")
        return parts[0] if parts else Init("zero", arch.shape_of(out_spec, dims))
    return parts[0] if len(parts) == 1 else Concat(parts, dim=axis)


def _padded(recipe: Recipe, out_spec, width: int, size: int) -> Recipe:
    """Zero neurons appended up to `size` (the config's one intermediate_size), along the tensor's neuron axis."""
    if "ffn" not in out_spec.shape or width >= size:
        return recipe
    return PadRows(recipe, size, dim=out_spec.shape.index("ffn"))


def build_plan(source: Checkpoint, family, dense, weights: dict[int, list[float]], shared: str | None,
               details: dict, notes: list[str]) -> Plan:
    """`dense` is the dense family, or `family` itself (an ``AllDense`` dense form: its config makes every layer
    dense)."""
    config = source.config
    where = source.directory / "config.json"
    layout = arch.detect_expert_layout(family, source.tensors)
    dims = arch.dimensions(family, config, where)
    shared_ffn = dims.get("shared_ffn") or 0 if shared == "fold" else 0
    extracted = dims["expert_ffn"] + shared_ffn
    dense_sizes = [dims["ffn"]] if len(weights) < dims["layers"] else []
    size = max([extracted] + dense_sizes)
    if dense is family:
        new_config = all_dense_config(family, config, size)
    else:
        new_config = dense_config(family, config, dense, size, where)
    leave_out_mtp(source, family, layout, new_config, notes, "extract", "transformers does not run them")
    _, scale = routed_scale(family, config)
    pieces = dense_roles(family, expert_parts(source, family, config, layout))
    views = {name: (stored, (start, stop)) for name, (stored, start, stop) in arch.source_views(family, config).items()}
    tensors = []
    for expected in arch.expected_tensors(dense, new_config, "per_expert", "the output's config.json").values():
        if expected.group != "ffn":
            recipe = Copy(source, expected.name)
        else:
            out_spec = dense.spec("ffn", expected.role)
            if expected.layer in weights:
                recipe = _moe_ffn(source, family, out_spec, expected.layer, pieces, views, weights[expected.layer],
                                  shared, scale, dims)
                width = extracted
            else:
                recipe = Copy(source, family.spec("ffn", expected.role).name(expected.layer))
                width = dims["ffn"]
            recipe = _padded(recipe, out_spec, width, size)
        inputs = recipe.inputs() or next(piece for key, piece in pieces.items() if key[1] == expected.layer).inputs()
        tensors.append(OutputTensor(expected.name, expected.shape, source.info(inputs[0][1]).dtype, recipe))
    metadata = {"surgery_sources": json.dumps([str(source.path)]), "surgery_extract": json.dumps(details)}
    return Plan("extract", tensors, new_config, [source], side_files=source.side_files(), metadata=metadata,
                notes=notes, details={"extract": details})


def describe(options, family, dense, shared: str | None, frequencies, config: dict) -> list[str]:
    """The notes of a run: what the dense FFN is, true of this run."""
    notes = []
    if dense is family:
        keys = family.dense_form.keys({**family.defaults, **config})
        target = f"{family.name} with every layer dense (" + ", ".join(f"{k}: {v}" for k, v in keys.items()) + ")"
    else:
        target = f"{family.name} -> {dense.name}"
    key, scale = routed_scale(family, config)
    scaled = f"; its down_proj times {key} {scale:g}" if scale != 1.0 else ""
    if options.expert is not None:
        copied = ("its gate_up and down transposed into gate, up and down" if isinstance(family.dense_form, AllDense)
                  and family.dense_form.expert_roles else "byte copies")
        notes.append(f"{target}: every MoE layer's FFN is expert {options.expert}'s ({copied}{scaled})")
    else:
        notes.append(f"{target}: every MoE layer's FFN is the "
                     + ("mean" if options.average == "uniform" else "routing-frequency-weighted mean")
                     + " of the experts' weights, not of their outputs: the extract computes something else than "
                       "the MoE"
                     + (f" (frequencies from {frequencies['calibration']}, {frequencies['tokens']} tokens)"
                        if frequencies else "") + (f" ({scaled[2:]})" if scaled else ""))
    if shared == "fold":
        notes.append(f"the shared expert's neurons are appended to each MoE layer's FFN, its down_proj scaled by "
                     f"{family.shared_scale:g}" + (" (its gate's sigmoid at 0: exact only where the gate's weights "
                                                   "are zero)" if family.shared_scale != 1.0 else " (exact)"))
    elif shared == "drop":
        notes.append("the shared expert is left out (--shared-gate drop)")
    if dense is family:
        notes.append(_computed(options, family, shared, config))
    return notes


def _computed(options, family, shared: str | None, config: dict) -> str:
    """What an MoE layer's dense FFN computes, against what the MoE computes (an extract is exact only where the
    experts are identical and their top-k weights sum to 1)."""
    key, scale = routed_scale(family, config)
    routed = f"expert {options.expert}'s FFN" if options.expert is not None else "the averaged FFN"
    if scale != 1.0:
        routed = f"{key} {scale:g} x {routed}"
    if shared == "fold":
        routed += " + the shared experts' FFN"
    if arch.renormalises_top_k(family, config):
        times = f", times {key} {scale:g}" if key else ""
        return (f"each MoE layer's dense FFN computes {routed}: the MoE's output where its experts are identical "
                f"(their top-k weights sum to 1{times}), an approximation otherwise")
    why = f"{family.top_k_norm} false" if family.top_k_norm else f"{family.architecture}'s router never does"
    return (f"each MoE layer's dense FFN computes {routed}; the MoE's top-k weights are not renormalised ({why}) "
            f"and sum to less than 1, so the two differ even where the experts are identical")
