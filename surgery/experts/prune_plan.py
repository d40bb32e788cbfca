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
from surgery.plan.nodes import Copy, Rows
from surgery.plan.plan import OutputTensor, Plan


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


def choose(scores: dict[int, list[float]], keep: int) -> dict[int, list[int]]:
    """{layer: the `keep` best-scored experts, in index order}; ties keep the lower index."""
    return {layer: sorted(sorted(range(len(values)), key=lambda e: -values[e])[:keep])
            for layer, values in scores.items()}


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
    router = family.fused_router or family.router if layout == "fused" else family.router
    tensors = []
    for expected in arch.expected_tensors(family, new_config, "per_expert").values():
        if expected.group == "experts":
            recipe = pieces[(expected.role, expected.layer, kept[expected.layer][expected.expert])]
        elif expected.group == "router":
            recipe = Rows(source, router.name(expected.layer), kept[expected.layer])
        else:
            recipe = Copy(source, expected.name)
        tensors.append(OutputTensor(expected.name, expected.shape, source.info(recipe.name).dtype, recipe))
    known = arch.expected_tensors(family, config, layout)
    extra = [name for name in source.tensors if name not in known]
    if extra:
        raise SurgeryError(f"{source.directory}: tensor {extra[0]!r} is not part of a {family.architecture} "
                           f"checkpoint with this config.json; prune would drop it")
    metadata = {"surgery_sources": json.dumps([str(source.path)]), "surgery_prune": json.dumps(details)}
    return Plan("prune", tensors, new_config, [source], side_files=source.side_files(),
                extra_files={"README.md": model_card(source, details)}, metadata=metadata, notes=notes,
                details={"prune": details})


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
