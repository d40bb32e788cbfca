"""Pieces every dense -> MoE operation (upcycle, split, merge) shares.

An MoE plan is the target family's expected tensor list (from ``surgery.families``) with a
recipe for each entry. The non-FFN tensors (embeddings, attention, norms, head) come from the
same role in the dense source; operations only decide the recipes of routers, experts, shared
experts and dense FFNs. ``moe_tensors`` walks the target's tensors in model order, so every
operation writes the same layout and ordering.
"""

from __future__ import annotations

import json
import math
from typing import Callable

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.families import Expected, Family
from surgery.io.checkpoint import Checkpoint
from surgery.plan.nodes import Copy, Init, Joined, Recipe
from surgery.plan.plan import OutputTensor

MOE_GROUPS = ("router", "experts", "shared_expert", "ffn")

# Some formats always have a shared expert (qwen2_moe). Where the operation has nothing to put there,
# every operation writes the same inert one: all zeros with gate 0, so it adds exactly 0. Eight
# neurons, not one, so that tensor-parallel loaders (vLLM shards it over up to 8 GPUs) can split it.
INERT_SHARED_FFN = 8


def check_expert_counts(num_experts: int, top_k: int) -> None:
    """The --num-experts / --top-k rules every operation with those options shares."""
    if num_experts < 2:
        raise SurgeryError(f"--num-experts {num_experts}: an MoE layer needs at least 2 experts")
    if not 1 <= top_k <= num_experts:
        raise SurgeryError(f"--top-k {top_k}: must be between 1 and --num-experts ({num_experts})")


def folded_rounding(factors, dtype: str) -> str | None:
    """`dtype` when a factor folded into weights stored in it is not a power of two (so the stored weights
    are rounded and an exact rewrite is exact only up to that rounding), else None."""
    if dtype in ("F32", "F64"):
        return None
    return dtype if any(not math.log2(abs(float(f))).is_integer() for f in factors if f) else None


def inert_shared_ffn(target: Family) -> int | None:
    """Neurons of the inert shared expert an operation with nothing to share writes: INERT_SHARED_FFN for a
    format that always has a shared expert, else None (no shared expert)."""
    return INERT_SHARED_FFN if target.shared_expert and target.shared_required else None


def inert_shared_expert(expected: Expected) -> Recipe:
    """A tensor of the inert shared expert (weights and gate alike: zeros)."""
    return Init("zero", expected.shape)


def inert_shared_note(target: Family) -> str:
    return (f"{target.name} always has a shared expert: writing an inert all-zero one ({INERT_SHARED_FFN} neurons, "
            "gate 0; it adds exactly 0)")


def source_name(source_family: Family, expected: Expected) -> str:
    """Name of the dense tensor that plays `expected`'s role (attention, norms, embedding, head)."""
    return source_family.spec(expected.group, expected.role).name(expected.layer)


def dense_ffn_names(source_family: Family, layer: int) -> dict[str, str]:
    """{'gate': ..., 'up': ..., 'down': ...} names of a dense layer's FFN in the source."""
    return {role: source_family.spec("ffn", role).name(layer) for role in ("gate", "up", "down")}


def moe_tensors(target: Family, target_config: dict, source: Checkpoint, source_family: Family,
                ffn_recipe: Callable[[Expected], Recipe], dtype: str | None = None,
                non_ffn_recipe: Callable[[Expected, str], Recipe] | None = None) -> list[OutputTensor]:
    """Every output tensor of the MoE model, in model order.

    `ffn_recipe(expected)` gives the recipe of routers, experts, shared experts and dense FFNs;
    every other tensor is `non_ffn_recipe(expected, source_tensor_name)` (default: a copy from
    `source`). Output dtype: `dtype` if given, else the stored dtype of the matching source tensor
    (for new tensors such as routers: that of the embedding).
    """
    fallback_dtype = source.info(source_family.spec("embedding", "embed").name()).dtype
    out = []
    dims = arch.dimensions(target, target_config)
    for expected in arch.expected_tensors(target, target_config).values():
        if expected.group in MOE_GROUPS and "+" in expected.role:  # roles the target stores fused (Joined)
            parts = [ffn_recipe(Expected(spec.name(expected.layer), arch.shape_of(spec, dims), expected.group, role,
                                         expected.layer)) for role in expected.role.split("+")
                     for spec in [target.spec(expected.group, role)]]
            recipe = Joined(parts, expected.shape)
            stored = _input_dtype(recipe) or fallback_dtype
        elif expected.group in MOE_GROUPS:
            recipe = ffn_recipe(expected)
            stored = _input_dtype(recipe) or fallback_dtype
        else:
            name = source_name(source_family, expected)
            if name not in source.tensors:
                raise SurgeryError(f"{source.directory}: tensor {name!r} (needed for {expected.name}) is missing")
            info = source.tensors[name]
            if tuple(info.shape) != expected.shape:
                raise SurgeryError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, config.json implies {list(expected.shape)}")
            recipe = non_ffn_recipe(expected, name) if non_ffn_recipe else Copy(source, name)
            stored = info.dtype
        out.append(OutputTensor(expected.name, expected.shape, dtype or stored, recipe))
    return out


def _input_dtype(recipe: Recipe) -> str | None:
    inputs = recipe.inputs()
    return inputs[0][0].info(inputs[0][1]).dtype if inputs else None


def parse_moe_layers(text: str, num_layers: int) -> list[int]:
    """'all', 'every-other' (layers 1, 3, 5 ... as Sparse Upcycling) or a list '0,2,5-7' -> MoE layer indices."""
    text = (text or "all").strip().lower()
    if text == "all":
        return list(range(num_layers))
    if text == "every-other":
        return list(range(1, num_layers, 2))
    layers = set()
    try:
        for part in text.split(","):
            if "-" in part:
                start, end = (int(x) for x in part.split("-"))
                layers.update(range(start, end + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise SurgeryError(f"--moe-layers {text!r}: expected all, every-other or a list such as 0,2,5-7") from None
    bad = sorted(layer for layer in layers if not 0 <= layer < num_layers)
    if bad:
        raise SurgeryError(f"--moe-layers: layer {bad[0]} does not exist (the model has {num_layers} layers: 0-{num_layers - 1})")
    if not layers:
        raise SurgeryError("--moe-layers selects no layer")
    return sorted(layers)


def provenance(sources: list[Checkpoint], options: dict) -> dict[str, str]:
    """safetensors header metadata recording where the output came from and how."""
    return {"surgery_sources": json.dumps([str(s.path) for s in sources]),
            "surgery_options": json.dumps(options, sort_keys=True, default=str)}
