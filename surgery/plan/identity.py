"""The identity plan: every tensor of a checkpoint copied as it is (``surgery copy``), the engine's end-to-end test.

It re-shards, casts (``--dtype``: a quantized source's weights dequantized, ``Plan.dequantize``) and converts the expert layout (through the writer's ``--layout``); it also
rewrites what an MoE's config says about routing without touching a weight: the top-k and whether the top-k
weights are renormalised (``change_routing``), with notes that say what changes in the forward pass.
"""

from __future__ import annotations

import json

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.io.checkpoint import Checkpoint
from surgery.io.dtypes import FLOAT_DTYPES, parse_dtype, set_config_dtype
from surgery.plan.nodes import Copy
from surgery.plan.plan import OutputTensor, Plan


def output_dtype(stored: str, requested: str | None) -> str:
    """The dtype a tensor is written in: `requested` for floating tensors, else unchanged."""
    return requested if requested and stored in FLOAT_DTYPES else stored


def build_plan(source: Checkpoint, dtype: str | None = None, top_k: int | None = None,
               norm_topk_prob: bool | None = None) -> Plan:
    target = None if dtype in (None, "keep") else parse_dtype(dtype)
    tensors = [OutputTensor(name, info.shape, output_dtype(info.dtype, target), Copy(source, name))
               for name, info in source.tensors.items()]
    config, notes = None, []
    if source.config is not None:
        config = dict(source.config)
        set_config_dtype(config, target)
    if top_k is not None or norm_topk_prob is not None:
        notes = change_routing(source, config, top_k, norm_topk_prob)
    options = {"dtype": dtype or "keep"}
    options.update({key: value for key, value in (("top_k", top_k), ("norm_topk_prob", norm_topk_prob))
                    if value is not None})
    return Plan("copy", tensors, config, [source], side_files=source.side_files(),
                metadata={"surgery_sources": json.dumps([str(source.path)]),
                          "surgery_options": json.dumps(options)}, notes=notes, dequantize=target is not None)


def change_routing(source: Checkpoint, config: dict | None, top_k: int | None, norm: bool | None) -> list[str]:
    """Rewrite the routing keys of an MoE `config` in place; returns the notes saying what the forward pass now does."""
    where = source.directory / "config.json"
    if config is None:
        raise SurgeryError(f"{where}: no such file (--top-k and --norm-topk-prob rewrite the config)")
    family = arch.detect_family(config, where)
    if family.kind != "moe":
        raise SurgeryError(f"{where}: {family.architecture} is a dense model; --top-k and --norm-topk-prob apply to "
                           "MoE models")
    dims = arch.dimensions(family, config, where)
    notes = []
    renormalised = arch.renormalises_top_k(family, config)
    if norm is not None:
        if family.top_k_norm is None:
            raise SurgeryError(f"--norm-topk-prob: {family.name} "
                               + ("always" if renormalised else "never") + " renormalises its top-k weights (its "
                               "config has no such switch)")
        config[family.top_k_norm] = norm
        if norm != renormalised:
            notes.append(f"{family.top_k_norm} {str(renormalised).lower()} -> {str(norm).lower()}: each selected "
                         + (f"expert now weighs its {family.router_scoring} score renormalised over the top-k (the "
                            "weights sum to 1)" if norm else f"expert now weighs its {family.router_scoring} score "
                            + ("over all experts (the weights sum to less than 1)"
                               if family.router_scoring == "softmax" else "(the weights need not sum to 1)")))
        renormalised = norm
    if top_k is not None:
        key, old = family.moe_keys["top_k"][0], dims.get("top_k")
        if not 1 <= top_k <= dims["experts"]:
            raise SurgeryError(f"--top-k {top_k}: must be between 1 and the number of experts ({dims['experts']})")
        groups, used = arch.route_groups(family, config)
        if top_k > used * (dims["experts"] // groups):
            raise SurgeryError(f"--top-k {top_k}: a token may use {used} of {groups} expert groups "
                               f"({family.group_keys[1]}), {used * (dims['experts'] // groups)} experts in all")
        config[key] = top_k
        if top_k != old:
            notes.append(f"{key} {old} -> {top_k}: each token now runs through {top_k} expert(s) per MoE layer "
                         f"({'more' if top_k > (old or 0) else 'less'} compute per token); "
                         + ("their weights are renormalised over them, so the output is a different mixture"
                            if renormalised else "their weights are their softmax probabilities, not renormalised")
                         + " than the one the model was trained with")
    return notes
