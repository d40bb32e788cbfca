"""The prune plan: every MoE layer keeps its best-scored routed experts, as byte copies.

Kept experts are byte copies of the source's (in either stored layout), the router keeps the kept experts'
rows in their original order, every other tensor (attention, norms, a shared expert, dense layers) is copied.
The config gets the new expert count; the top-k is the source's unless `--top-k` says otherwise. The scores and
the kept and dropped experts of each layer go into the safetensors metadata, the model card and the plan's
JSON.
"""

from __future__ import annotations

import json
import math

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.io.checkpoint import Checkpoint
from surgery.plan.layouts import expert_parts
from surgery.plan.nodes import Columns, Copy, Joined, Rows
from surgery.plan.plan import OutputTensor, Plan
from surgery.plan.sources import leave_out_mtp


def kept_count(options, experts: int) -> int:
    if options.keep is not None:
        if options.keep >= experts:
            raise SurgeryError(f"--keep {options.keep}: must be below the source's {experts} experts per MoE layer "
                               "(--ratio 0 keeps them all)")
        return options.keep
    return experts - math.floor(options.ratio * experts + 1e-9)


def output_top_k(options, top_k: int, keep: int, notes: list[str]) -> int:
    if options.top_k is not None:
        if options.top_k > keep:
            raise SurgeryError(f"--top-k {options.top_k} exceeds the {keep} experts kept per layer")
        return options.top_k
    if top_k <= keep:
        return top_k
    if options.keep is not None:
        raise SurgeryError(f"--keep {keep} is below the source's top-k ({top_k}): give --top-k K (at most {keep}) "
                           f"to route each token to fewer experts")
    notes.append(f"top-k clamped from {top_k} to {keep}, the experts kept per layer (--ratio {options.ratio})")
    return keep


def group_rule(family, config: dict, experts: int, keep: int, top_k: int, options, notes: list[str]) -> int:
    """The experts kept per layer under group-limited routing: the same number in every group (llm-compressor's
    rule: routing picks groups first, so each group must stay the same size), at least the fewest a group's score
    needs, and enough that the groups a token may use still hold its top-k. Refused, with the numbers, otherwise."""
    groups, used = arch.route_groups(family, config)
    if groups == 1 and keep >= family.group_min_experts:
        return keep
    n_group, topk_group = family.group_keys or ("groups", "groups used")
    if groups > 1 and keep % groups:
        if options.keep is not None:
            lower, upper = keep // groups * groups, -(-keep // groups) * groups
            raise SurgeryError(f"--keep {keep}: {n_group} = {groups}, and every group must keep the same number of "
                               f"experts (routing picks groups first); keep a multiple of {groups} ("
                               + " or ".join(str(v) for v in (lower, upper) if 0 < v < experts) + ")")
        dropped = round((experts - keep) / groups) * groups
        notes.append(f"--ratio {options.ratio} would keep {keep} of {experts} experts; {n_group} = {groups} groups "
                     f"keep equal numbers, so {experts - dropped} are kept ({(experts - dropped) // groups} per group)")
        keep = experts - dropped
    per_group = keep // groups
    if per_group < family.group_min_experts:
        raise SurgeryError(f"keeping {keep} of {experts} experts leaves {per_group} per group ({n_group} = {groups}); "
                           f"a group's routing score sums its top-{family.group_min_experts}, so each group must keep at "
                           f"least {family.group_min_experts} ({family.group_min_experts * groups} experts)")
    if used * per_group < top_k:
        raise SurgeryError(f"keeping {per_group} experts per group, the {topk_group} = {used} groups a token may use "
                           f"hold {used * per_group} experts, fewer than its top-k {top_k}: keep at least "
                           f"{-(-top_k // used) * groups} experts or lower --top-k")
    return keep


def choose(scores: dict[int, list[float]], keep: int, groups: int = 1) -> dict[int, list[int]]:
    """{layer: the `keep` best-scored experts, in index order; with `groups`, the keep/groups best of each group of
    consecutive experts}; ties keep the lower index."""
    def best(values, members, count):
        return sorted(members, key=lambda e: -values[e])[:count]

    out = {}
    for layer, values in scores.items():
        size = len(values) // groups
        out[layer] = sorted(e for g in range(groups) for e in best(values, range(g * size, (g + 1) * size),
                                                                   keep // groups))
    return out


# ------------------------------------------------------------------ the plan
def build_plan(source: Checkpoint, family, kept: dict[int, list[int]], top_k: int, details: dict,
               notes: list[str]) -> Plan:
    config = source.config
    layout = arch.detect_expert_layout(family, source.tensors)
    new_config = dict(config)
    for dimension, value in (("experts", len(next(iter(kept.values())))), ("top_k", top_k)):
        keys = [key for key in family.moe_keys[dimension] if key in config] or list(family.moe_keys[dimension][:1])
        new_config.update({key: value for key in keys})
    pieces = expert_parts(source, family, config, layout)
    routers = {spec.role: spec for spec in arch.router_specs(family, layout)}
    tensors = []
    written = family.stored_layouts[0] if "per_expert" not in family.stored_layouts else "per_expert"
    for expected in arch.expected_tensors(family, new_config, written).values():
        if expected.group == "experts" and written == "per_expert":
            recipe = pieces[(expected.role, expected.layer, kept[expected.layer][expected.expert])]
        elif expected.group == "experts":  # stored fused only: the kept experts' byte ranges, one after another
            recipe = Joined([pieces[(part, expected.layer, expert)] for expert in kept[expected.layer]
                             for part in family.fused_parts[expected.role]], expected.shape)
        elif expected.group == "router":  # every per-expert router tensor: the kept experts along its axis
            recipe = experts_of(source, family, expected, routers, kept[expected.layer])
        else:
            recipe = Copy(source, expected.name)
        tensors.append(OutputTensor(expected.name, expected.shape, source.info(recipe.inputs()[0][1]).dtype, recipe))
    leave_out_mtp(source, family, layout, new_config, notes, "prune",
                  "transformers does not run them, so their experts cannot be scored")
    metadata = {"surgery_sources": json.dumps([str(source.path)]), "surgery_prune": json.dumps(details)}
    return Plan("prune", tensors, new_config, [source], side_files=source.side_files(),
                extra_files={"README.md": model_card(source, details)}, metadata=metadata, notes=notes,
                details={"prune": details})


def experts_of(source: Checkpoint, family, expected, routers: dict, kept: list[int]):
    """The kept experts' slices of a per-expert router tensor (its weight, a bias), along the axis its shape calls
    ``experts``: rows, or the last axis."""
    spec = routers[expected.role]
    name = spec.name(expected.layer)
    axis = spec.shape.index("experts")
    if axis == 0:
        return Rows(source, name, kept)
    if axis == len(spec.shape) - 1:
        return Columns(source, name, kept)
    raise AssertionError(f"{name}: experts along axis {axis}")


def model_card(source: Checkpoint, details: dict) -> str:
    lines = [f"# {source.directory.name}, pruned", "",
             f"Made with `surgery prune` from `{source.directory.name}`: {details['experts']} -> {details['kept']} "
             f"routed experts per MoE layer, top-k {details['top_k']}, criterion `{details['criterion']}`"
             + (f" on {details['calibration']} ({details['tokens']} tokens)" if details.get("calibration") else "")
             + ". Kept experts are byte copies of the source's; each router keeps the kept experts' rows in their "
               "original order.", "",
             "| layer | kept (source index) | dropped | scores |", "|---|---|---|---|"]
    for layer, entry in details["layers"].items():
        scores = ", ".join(f"{value:.4g}" for value in entry["scores"])
        lines.append(f"| {layer} | {', '.join(map(str, entry['kept']))} | {', '.join(map(str, entry['dropped'])) or '-'} "
                     f"| {scores} |")
    return "\n".join(lines) + "\n"
