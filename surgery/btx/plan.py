"""The plan of a ``surgery merge``: every output tensor of the merged MoE with its recipe, from headers only.

``build_plan`` gives each expert FFN tensor a copy of its model's dense FFN, every other tensor the recipe of
``non_ffn_recipe`` (the weighted mean, one model's copy, or a RegMean weight deferred until the models have
run) and each router the recipe of ``router_recipe`` for ``--router-init`` (data-free rows from the router
registry; embedding rows computed when written; calibrated routers deferred until the draft is written).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from surgery import families as arch
from surgery.btx import card
from surgery.btx.card import expert_provenance, model_card, non_ffn_description
from surgery.btx.members import Merge
from surgery.btx.spec import REGMEAN
from surgery.errors import SurgeryError
from surgery.execution.routers import registry as router_registry
from surgery.execution.routers.request import RouterRequest
from surgery.plan.diversity import FfnNoise, stream_seed
from surgery.plan.mean import WeightedMean
from surgery.plan.moe import dense_ffn_names, inert_shared_expert, moe_tensors, provenance
from surgery.plan.nodes import Apply, Copy, Deferred, Lazy, RouterSlot, Scale
from surgery.plan.plan import Plan
from surgery.seeds import router_seed

ROUTER_STD = 0.02


@dataclass(frozen=True)
class RegMeanSlot:
    """What a Deferred non-FFN weight is: RegMean's merge of stored tensor `source_name`, a linear layer whose input
    is that of `module` in decoder layer `layer` (the head: layer None, module "": the final norm's output)."""

    source_name: str
    layer: int | None
    module: str


def regmean_text(slot: RegMeanSlot, plus: bool, head_fit: bool) -> str:
    whose = "the merged model's" if plus else "each model's own"
    where = f"inputs of {slot.module}" if slot.module else "final-norm outputs"
    refit = ", then refitted to the experts' next-token distributions (--head-fit)" if head_fit else ""
    return f"regmean{'++' if plus else ''} of {slot.source_name} ({whose} {where}, alpha {card.ALPHA}){refit}"


def regmean_module(family, config: dict, expected) -> str | None:
    """The module whose input feeds `expected` (an output tensor of the merge), relative to its decoder layer
    ("" for the head: the final norm's output), or None when RegMean does not apply to it."""
    if expected.group == "head":
        return ""
    if expected.group != "attention" or expected.role not in ("q", "k", "v", "o"):
        return None
    return projection_module(family, config, expected.layer, expected.role)


def projection_module(family, config: dict, layer: int, role: str) -> str:
    """The module holding attention projection `role` (q, k, v, o) of `layer`, relative to the layer."""
    name = family.spec("attention", role).name(layer)
    stored = arch.source_views(family, config).get(name, (name,))[0]  # Phi-3: the fused qkv_proj holds q
    return stored.split(f"layers.{layer}.", 1)[1].removesuffix(".weight")


def non_ffn_recipe(merge: Merge):
    """Weighted mean over every model with a positive weight, or a copy of one model, or (regmean) the linear
    layers fitted to each model's inputs and the rest averaged (--non-ffn)."""
    choice = merge.spec.non_ffn
    if choice not in ("average", *REGMEAN):
        member = merge.member(choice)
        return lambda expected, name: Copy(member.checkpoint, name)
    averaged = [m for m in merge.members if merge.weights[m.name] != 0]
    config = merge.reference.checkpoint.config

    def recipe(expected, name):
        if len(averaged) == 1:
            return Copy(averaged[0].checkpoint, name)
        module = regmean_module(merge.source_family, config, expected) if choice in REGMEAN else None
        if module is not None:
            slot = RegMeanSlot(name, expected.layer, module)
            return Deferred(regmean_text(slot, choice == "regmean++", merge.spec.head_fit and expected.layer is None),
                            slot)
        per_row = choice in REGMEAN and expected.group == "embedding"  # RegMean on one-hot inputs: token counts
        return WeightedMean([Copy(m.checkpoint, name) for m in averaged], [merge.weights[m.name] for m in averaged],
                            per_row=per_row)

    return recipe


def router_recipe(merge: Merge, embedding_router):
    init = merge.spec.router_init
    hidden = merge.config["hidden_size"]

    def recipe(layer: int):
        if init in ("zero", "normal"):
            request = RouterRequest(len(merge.experts), hidden, seed=router_seed(merge.spec.router_seed, layer),
                                    std=ROUTER_STD)
            return router_registry.node(init, request)
        if init == "embedding":
            return embedding_router
        domains = ", ".join(d.name for d in merge.domains())
        return Deferred(f"calibrated on {domains} ({merge.spec.router_fit}; fitted layer by layer on the written "
                        "draft)", RouterSlot(layer))

    return recipe


def _embedding_router(merge: Merge, embed_recipe):
    cache = {}

    def compute():
        if "rows" not in cache:
            from surgery.btx.routers import embedding_rows  # lazy: computing rows imports torch

            cache["rows"] = embedding_rows(merge, embed_recipe.compute())
        return cache["rows"]

    names = ", ".join(d.name for d in merge.domains())
    return Lazy(f"mean input embedding of calibration text ({names})", compute)


def build_plan(merge: Merge) -> Plan:
    """Every output tensor of the merged MoE with its recipe, from headers only.

    Calibrated routers are Deferred: fitted on the written draft (``surgery.btx.run``).
    """
    family, target = merge.source_family, merge.target
    non_ffn = non_ffn_recipe(merge)
    embed_name = family.spec("embedding", "embed").name()
    embedding_router = None
    if merge.spec.router_init == "embedding":
        embedding_router = _embedding_router(merge, non_ffn(None, embed_name))
    router = router_recipe(merge, embedding_router)

    def ffn_recipe(expected):
        if expected.group == "router":
            return router(expected.layer)
        if expected.group == "shared_expert":  # inert (a format that always has one) unless a model's FFN is given
            if merge.shared is None:
                return inert_shared_expert(expected)
            if expected.role == "shared_gate":
                return shared_gate_recipe(merge, expected)
            return expert_ffn(merge, merge.shared, len(merge.experts), expected.layer, expected.role)
        if expected.group == "experts":
            return expert_ffn(merge, merge.experts[expected.expert], expected.expert, expected.layer, expected.role)
        raise SurgeryError(f"{target.name}: merge cannot fill {expected.group} tensor {expected.name}")

    reference = merge.reference.checkpoint
    tensors = moe_tensors(target, merge.config, reference, family, ffn_recipe, merge.dtype, non_ffn)
    options = merge.spec.to_options()
    options["router_init"] = merge.spec.router_init
    metadata = provenance([m.checkpoint for m in merge.members], options)
    metadata["surgery_experts"] = json.dumps(expert_provenance(merge))
    metadata["surgery_non_ffn"] = json.dumps(non_ffn_description(merge))
    notes = list(merge.notes)
    return Plan("merge", tensors, merge.config, [m.checkpoint for m in merge.members],
                side_files=reference.side_files(), extra_files={"README.md": model_card(merge)},
                metadata=metadata, notes=notes,
                dequantize=merge.spec.dtype not in (None, "keep"))  # --dtype widens a quantized member, as copy's


def expert_ffn(merge: Merge, member, index: int, layer: int, role: str):
    """One matrix of an expert (index: its place; the shared expert's is after the routed ones): the member's
    dense FFN matrix, bit for bit, unless noise_scale adds noise to it or a factor scales its down_proj."""
    recipe = Copy(member.checkpoint, dense_ffn_names(merge.source_family, layer)[role])
    std = merge.spec.noise_scale.get(member.name, 0.0)
    if std:
        noise = FfnNoise(std, 1 if role == "down" else 0, stream_seed(merge.spec.router_seed, layer, index, f"noise_{role}"))
        recipe = Apply([recipe], noise, noise.describe())
    factor = merge.down_factor(member) if role == "down" else 1.0
    return Scale(recipe, factor) if factor != 1.0 else recipe


def shared_gate_recipe(merge: Merge, expected):
    if merge.shared_gate == "fitted":
        text = merge.spec.calibration[merge.shared.name].source
        return Deferred(f"shared gate calibrated on {text} against the routed experts' text",
                        RouterSlot(expected.layer, "shared_gate"))
    # a zero row: sigmoid(0) = 1/2 on every token; down_proj carries the factor 2
    return router_registry.node("zero", RouterRequest(*expected.shape))
