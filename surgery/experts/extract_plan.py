"""The extract plan: every MoE layer's FFN made from its routed experts, in the MoE's dense family.

The dense family is the one the MoE family is made from (``families.dense_family``: Mixtral -> Mistral,
Qwen2-MoE -> Qwen2, Qwen3-MoE -> Qwen3, FlexOlmo -> OLMo 2, GraniteMoE(Shared) -> Granite). Per MoE layer
the dense FFN is one expert's (byte copies) or the experts' weights averaged (``WeightedMean``); a shared
expert's neurons are appended (its down columns scaled by the share of its output the model adds) or left out.
Dense layers are copied, zero neurons appended where the extracted FFN is wider. Everything else is copied.
"""

from __future__ import annotations

import json

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.families.convert import dense_config
from surgery.io.checkpoint import Checkpoint
from surgery.plan.layouts import expert_parts
from surgery.plan.mean import WeightedMean
from surgery.plan.nodes import Concat, Copy, PadRows, Recipe, Scale
from surgery.plan.plan import OutputTensor, Plan


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


def _combined(pieces: dict, role: str, layer: int, weights: list[float]) -> Recipe:
    """One expert's piece (a byte copy) where a single weight is non-zero, else the weighted mean."""
    used = [(weight, pieces[(role, layer, expert)]) for expert, weight in enumerate(weights) if weight]
    if len(used) == 1:
        return used[0][1]
    return WeightedMean([recipe for _, recipe in used], [weight for weight, _ in used])


def build_plan(source: Checkpoint, family, dense, weights: dict[int, list[float]], shared: str | None,
               details: dict, notes: list[str]) -> Plan:
    config = source.config
    where = source.directory / "config.json"
    layout = arch.detect_expert_layout(family, source.tensors)
    dims = arch.dimensions(family, config, where)
    shared_ffn = dims.get("shared_ffn") or 0 if shared == "fold" else 0
    extracted = dims["expert_ffn"] + shared_ffn
    dense_sizes = [dims["ffn"]] if len(weights) < dims["layers"] else []
    size = max([extracted] + dense_sizes)
    new_config = dense_config(family, config, dense, size, where)
    known = arch.expected_tensors(family, config, layout, where)
    extra = [name for name in source.tensors if name not in known]
    if extra:
        raise SurgeryError(f"{source.directory}: tensor {extra[0]!r} is not part of a {family.architecture} "
                           f"checkpoint with this config.json; extract would drop it")
    pieces = expert_parts(source, family, config, layout)
    views = {name: (stored, (start, stop)) for name, (stored, start, stop) in arch.source_views(family, config).items()}
    tensors = []
    for expected in arch.expected_tensors(dense, new_config, "per_expert", "the output's config.json").values():
        if expected.group != "ffn":
            recipe = Copy(source, expected.name)
        elif expected.layer in weights:
            recipe = _combined(pieces, expected.role, expected.layer, weights[expected.layer])
            if shared == "fold":
                name = family.spec("shared_expert", expected.role).name(expected.layer)
                part = Copy(source, *views[name]) if name in views else Copy(source, name)
                if expected.role == "down" and family.shared_scale != 1.0:
                    part = Scale(part, family.shared_scale)
                recipe = Concat([recipe, part], dim=1 if expected.role == "down" else 0)
        else:
            recipe = Copy(source, family.spec("ffn", expected.role).name(expected.layer))
            stored = source.info(recipe.name).shape
            if list(stored) != list(expected.shape):
                recipe = PadRows(recipe, size, dim=-1 if expected.role == "down" else 0)
        if expected.group == "ffn" and expected.layer in weights and size > extracted:
            recipe = PadRows(recipe, size, dim=-1 if expected.role == "down" else 0)
        dtype = source.info(recipe.inputs()[0][1]).dtype
        tensors.append(OutputTensor(expected.name, expected.shape, dtype, recipe))
    metadata = {"surgery_sources": json.dumps([str(source.path)]), "surgery_extract": json.dumps(details)}
    return Plan("extract", tensors, new_config, [source], side_files=source.side_files(), metadata=metadata,
                notes=notes, details={"extract": details})


def describe(options, family, dense, shared: str | None, frequencies) -> list[str]:
    """The notes of a run: what the dense FFN is, true of this run."""
    notes = []
    if options.expert is not None:
        notes.append(f"{family.name} -> {dense.name}: every MoE layer's FFN is expert {options.expert}'s (byte copies)")
    else:
        notes.append(f"{family.name} -> {dense.name}: every MoE layer's FFN is the "
                     + ("mean" if options.average == "uniform" else "routing-frequency-weighted mean")
                     + " of the experts' weights, not of their outputs: the extract computes something else than "
                       "the MoE"
                     + (f" (frequencies from {frequencies['calibration']}, {frequencies['tokens']} tokens)"
                        if frequencies else ""))
    if shared == "fold":
        notes.append(f"the shared expert's neurons are appended to each MoE layer's FFN, its down_proj scaled by "
                     f"{family.shared_scale:g}" + (" (its gate's sigmoid at 0: exact only where the gate's weights "
                                                   "are zero)" if family.shared_scale != 1.0 else " (exact)"))
    elif shared == "drop":
        notes.append("the shared expert is left out (--shared-gate drop)")
    return notes
