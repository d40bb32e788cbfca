"""The add-experts plan: every MoE layer gets each dense model's FFN as a new routed expert (byte copies).

The dense models must be of a dense family that converts into the MoE's (``dense_families``: Mixtral takes
Llama, Mistral and Phi-3) with the MoE's tensor names and shapes. Existing experts, router rows and shared
experts are byte copies; every other (non-FFN) weight is the MoE's (``--non-ffn keep``) or the element-wise
mean of the MoE's and each dense model's in float32 (``--non-ffn average``, the merge's ``WeightedMean``).
The routers are deferred: their new rows are fitted on the written draft (``surgery.experts.add_routers``).
"""

from __future__ import annotations

import json
from dataclasses import replace

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.io.checkpoint import Checkpoint
from surgery.plan.layouts import expert_parts
from surgery.plan.mean import WeightedMean
from surgery.plan.moe import MOE_GROUPS
from surgery.plan.nodes import Copy, Deferred, RouterSlot
from surgery.plan.plan import OutputTensor, Plan


def dense_families(moe) -> list:
    """The dense families whose models may add experts to an MoE of family `moe`: every one with a registered
    conversion into it (``families.CONVERSIONS``), in registry order."""
    return [family for family in arch.FAMILIES.values() if (family.name, moe.name) in arch.CONVERSIONS]


def dense_tensors(dense: Checkpoint, found, name: str, where) -> dict:
    """The tensors the dense model's config implies, each role its own (a role stored fused, Phi-3's qkv_proj,
    exposed as a view of its rows); refuses a missing tensor or a fused one of another shape."""
    views = arch.source_views(found, dense.config, where)
    fused = {stored for stored, _, _ in views.values()}
    for expected in arch.expected_tensors(found, dense.config, "per_expert", where).values():
        if expected.name not in dense.tensors:
            raise SurgeryError(f"{dense.directory}: tensor {expected.name!r} is missing in {name}")
        shape = tuple(dense.info(expected.name).shape)
        if expected.name in fused and shape != expected.shape:
            raise SurgeryError(f"{dense.info(expected.name).file}: tensor {expected.name!r} has shape {list(shape)} "
                               f"in {name}, but its config.json implies {list(expected.shape)}")
    for view, (stored, start, stop) in views.items():
        dense.add_view(view, stored, (start, stop))
    return arch.expected_tensors(replace(found, fused_sources=()), dense.config, "per_expert", where)


def check_dense(source: Checkpoint, family, dense: Checkpoint, name: str) -> dict:
    """Refuse a dense model that is not of a dense family converting into the MoE's, or not of its tensor names and
    shapes; returns its FFN names {(role, layer): tensor name}."""
    where = dense.directory / "config.json"
    accepted = dense_families(family)
    found = arch.detect_family(dense.config, where)
    if found.name not in {f.name for f in accepted}:
        takes = (f"takes experts from {' or '.join(f.architecture for f in accepted)} models" if accepted else
                 f"takes no experts from dense models (no dense family converts into {family.name})")
        raise SurgeryError(f"{where}: architecture is {found.architecture} in {name}, but a {family.architecture} "
                           f"{takes}")
    moe_shapes = {e.name: e.shape for e in arch.expected_tensors(family, source.config, "per_expert").values()}
    expert_shape = {e.role: e.shape for e in arch.expected_tensors(family, source.config, "per_expert").values()
                    if e.group == "experts"}
    ffn = {}
    for expected in dense_tensors(dense, found, name, where).values():
        shape = tuple(dense.info(expected.name).shape)
        if expected.group == "ffn" and expected.role in expert_shape:
            ffn[(expected.role, expected.layer)] = expected.name
            target = tuple(expert_shape[expected.role])
        elif expected.name in moe_shapes:
            target = tuple(moe_shapes[expected.name])
        else:
            raise SurgeryError(f"{dense.directory}: tensor {expected.name!r} is in {name} but not in the MoE")
        if shape != target:
            raise SurgeryError(f"{dense.info(expected.name).file}: tensor {expected.name!r} has shape {list(shape)} "
                               f"in {name}, but {list(target)} in the MoE")
    stored = {source.info(recipe.name).dtype for recipe in expert_parts(
        source, family, source.config, arch.detect_expert_layout(family, source.tensors)).values()}
    for tensor in ffn.values():  # new experts are byte copies: they must already be in the experts' dtype
        if dense.info(tensor).dtype not in stored:
            raise SurgeryError(f"{dense.info(tensor).file}: tensor {tensor!r} is {dense.info(tensor).dtype} in {name}, "
                               f"but the MoE's experts are {'/'.join(sorted(stored))}; convert it first "
                               f"(surgery copy {dense.directory} OUT --dtype ...)")
    return ffn


def router_names(source: Checkpoint, family) -> dict:
    """{MoE layer: name of its router tensor in `source`}, in the source's stored layout."""
    layout = arch.detect_expert_layout(family, source.tensors)
    router = family.fused_router or family.router if layout == "fused" else family.router
    return {layer: router.name(layer) for layer in arch.moe_layers(family, source.config)}


def build_plan(source: Checkpoint, family, denses: dict, ffns: dict, details: dict, notes: list[str]) -> Plan:
    """Every output tensor from headers only; the routers deferred (fitted on the written draft)."""
    config = source.config
    layout = arch.detect_expert_layout(family, source.tensors)
    count = arch.dimensions(family, config)["experts"]
    names = list(denses)
    new_config = dict(config)
    keys = [key for key in family.moe_keys["experts"] if key in config] or list(family.moe_keys["experts"][:1])
    new_config.update({key: count + len(names) for key in keys})
    pieces = expert_parts(source, family, config, layout)
    routers = router_names(source, family)
    non_ffn = non_ffn_recipe(source, denses, details["non_ffn"])
    tensors, averaged = [], []
    for expected in arch.expected_tensors(family, new_config, "per_expert").values():
        if expected.group == "experts" and expected.expert >= count:
            name = names[expected.expert - count]
            recipe = Copy(denses[name], ffns[name][(expected.role, expected.layer)])
            dtype = denses[name].info(recipe.name).dtype
        elif expected.group == "experts":
            recipe = pieces[(expected.role, expected.layer, expected.expert)]
            dtype = source.info(recipe.name).dtype
        elif expected.group == "router":
            dtype = source.info(routers[expected.layer]).dtype
            recipe = Deferred(f"rows 0-{count - 1} of {routers[expected.layer]}, then the rows of {', '.join(names)} "
                              "fitted on the written draft", RouterSlot(expected.layer))
        elif expected.group in MOE_GROUPS:  # a shared expert or its gate (a dense FFN of a non-MoE layer)
            recipe, dtype = Copy(source, expected.name), source.info(expected.name).dtype
        else:  # attention, norms, embeddings, head
            recipe, dtype = non_ffn(expected.name), source.info(expected.name).dtype
            averaged += [expected.name] if details["non_ffn"] == "average" else []
        tensors.append(OutputTensor(expected.name, expected.shape, dtype, recipe))
    known = arch.expected_tensors(family, config, layout)
    extra = [name for name in source.tensors if name not in known]
    if extra:
        raise SurgeryError(f"{source.directory}: tensor {extra[0]!r} is not part of a {family.architecture} "
                           f"checkpoint with this config.json; add-experts would drop it")
    if averaged:
        details["non_ffn_mean"] = {"method": "element-wise mean (float32), stored in the MoE's dtype",
                                   "models": [str(source.path)] + [str(d.path) for d in denses.values()],
                                   "weight": 1 / (1 + len(denses)), "tensors": len(averaged)}
        notes.append(f"--non-ffn average: {len(averaged)} non-FFN tensors (attention, norms, embeddings, head) are the "
                     f"mean of {source.directory.name} and {', '.join(names)}; existing experts, router rows and "
                     f"shared experts are byte copies, and the new rows are fitted on the averaged model")
    metadata = {"surgery_sources": json.dumps([str(source.path)] + [str(d.path) for d in denses.values()]),
                "surgery_add_experts": json.dumps(details)}
    return Plan("add-experts", tensors, new_config, [source, *denses.values()], side_files=source.side_files(),
                extra_files={"README.md": model_card(source, details)}, metadata=metadata, notes=notes,
                details={"add_experts": details})


def non_ffn_recipe(source: Checkpoint, denses: dict, choice: str):
    """name -> the recipe of a non-FFN tensor: a copy of the MoE's (keep), or the equal-weight mean of the MoE's
    and every dense model's (average; ``surgery merge``'s recipe)."""
    if choice == "keep":
        return lambda name: Copy(source, name)

    def recipe(name):
        for dense_name, dense in denses.items():
            if name not in dense.tensors:
                raise SurgeryError(f"{dense.directory}: tensor {name!r} is missing in {dense_name}; --non-ffn average "
                                   f"needs every non-FFN tensor of the MoE")
        return WeightedMean([Copy(checkpoint, name) for checkpoint in (source, *denses.values())],
                            [1.0] * (1 + len(denses)))

    return recipe


def model_card(source: Checkpoint, details: dict) -> str:
    if details["non_ffn"] == "average":
        mean = details["non_ffn_mean"]
        non_ffn = (f"Every other weight ({mean['tensors']} tensors: attention, norms, embeddings, head) is the "
                   f"element-wise mean of `{source.directory.name}` and the dense models, computed in float32 "
                   f"(`--non-ffn average`); the new router rows are fitted on this averaged model.")
    else:
        non_ffn = f"Every other weight is `{source.directory.name}`'s (`--non-ffn keep`)."
    lines = [f"# {source.directory.name}, with added experts", "",
             f"Made with `surgery add-experts` from `{source.directory.name}`: {details['experts']} -> "
             f"{details['experts'] + len(details['added'])} routed experts per MoE layer. Existing experts and router "
             f"rows are byte copies; each new expert is a byte copy of its dense model's FFN, its router row fitted "
             f"on its calibration text. {non_ffn}", "",
             "| expert | index | dense model | calibration | tokens | share of its text won per layer |",
             "|---|---|---|---|---|---|"]
    for entry in details["added"]:
        wins = ", ".join(f"{value:.0%}" for value in entry["wins"].values()) if "wins" in entry else "(when written)"
        lines.append(f"| {entry['name']} | {entry['index']} | {entry['dense']} | {entry['calibration']} | "
                     f"{entry['tokens']} | {wins} |")
    return "\n".join(lines) + "\n"
