"""A plan over a quantized source written quantized: each logical weight it copies becomes its stored parts.

Operations plan the model a quantized checkpoint encodes (``surgery.io.quantized``: one logical tensor per
quantized weight). ``keep_quantized`` turns such a plan into what is written:

* an output tensor that copies logical weights (a ``Copy``, whole or a block of rows; ``Rows`` of experts of a
  stacked tensor; a ``Joined`` of such copies, the fused layout) is written as the same recipe over each part, a
  byte copy of the FP8 values and of their scales, wherever the scheme's blocks allow it (``Scheme.part_rows``,
  ``Scheme.joinable``) and the output keeps the source's dtype;
* any other output that reads a quantized weight (an average, a fitted tensor, a cut through a block, a dtype
  change) is written unquantized in its planned dtype, never quantized again; its module goes into the output's
  ``quantization_config`` as not converted (``Scheme.kept_config``) and a note says how many;
* ``Plan.dequantize`` (``surgery copy --dtype``) widens every weight: the output has no ``quantization_config``.
"""

from __future__ import annotations

import math
from dataclasses import replace

from surgery.plan.nodes import Columns, Concat, Copy, Joined, Recipe, Rows
from surgery.plan.plan import OutputTensor, Plan


def keep_quantized(plan: Plan) -> Plan:
    quantized_sources = [source for source in plan.sources if getattr(source, "quantization", None) is not None]
    if not quantized_sources or plan.config is None:
        return plan
    config = dict(plan.config)
    if plan.dequantize:
        config.pop("quantization_config", None)
        return replace(plan, config=config)
    source = quantized_sources[0]
    scheme = source.quantization
    planned = []  # (tensor, its parts, or None: written unquantized), first for every tensor
    for tensor in plan.tensors:
        leaves = [(checkpoint, name) for checkpoint, name in tensor.recipe.inputs() if checkpoint.info(name).parts]
        keeps = leaves and all(_same_scheme(checkpoint, scheme) and checkpoint.info(name).dtype == tensor.dtype
                               for checkpoint, name in leaves)
        planned.append((tensor, bool(leaves), _parts(tensor, scheme) if keeps else None))
    # a module is quantized whole or not at all (transformers converts modules): one tensor written unquantized
    # takes its module's other tensors with it
    dequantized = {scheme.module_of(tensor.name) for tensor, reads, parts in planned if reads and parts is None}
    quantized = {scheme.module_of(tensor.name) for tensor, reads, parts in planned if parts is not None}
    dequantized |= {scheme.module_of(tensor.name) for tensor, reads, parts in planned  # e.g. a dense model's experts
                    if not reads and _is_weight(tensor) and scheme.module_of(tensor.name) in quantized}
    # a weight the plan makes (a new router, a fitted row, an average) is listed unquantized, so that transformers
    # never expects it quantized (Qwen2-MoE's shared_expert_gate and GraniteMoE's router are nn.Linear); a copy of
    # the source's unquantized weights is as the source's config already says
    made = {scheme.module_of(tensor.name) for tensor, reads, parts in planned
            if not reads and _is_weight(tensor) and not _selects(tensor.recipe)} - dequantized
    unquantized = dequantized | made
    tensors, renames, kept, stacked = [], {}, 0, False
    for tensor, reads, parts in planned:
        if parts is not None and scheme.module_of(tensor.name) not in unquantized:
            tensors.extend(parts)
            kept += 1
            stacked = stacked or isinstance(tensor.recipe, Joined)
        else:
            tensors.append(tensor)
        if not reads or parts is not None:
            _rename(tensor, scheme, renames)
    modules = {scheme.module_of(name) for name in source.tensors}
    notes = list(plan.notes)
    if kept:
        config["quantization_config"] = scheme.kept_config(sorted(set(unquantized)), renames, modules)
    else:
        config.pop("quantization_config", None)
    if dequantized:
        dtypes = sorted({tensor.dtype for tensor in plan.tensors if scheme.module_of(tensor.name) in dequantized})
        notes.append(f"{len(dequantized)} module(s) of {scheme.method} weights are written unquantized "
                     f"({', '.join(dtypes)}: dequantized, never quantized again)"
                     + (f"; they are listed in quantization_config's {scheme.skip_key}" if kept else
                        "; the output has no quantization_config"))
    if stacked and scheme.stacked_note:
        notes.append(scheme.stacked_note)
    if made and kept:
        notes.append(f"the {len(made)} module(s) whose weights this {plan.operation} computes (routers, fitted or "
                     f"averaged weights) are written unquantized and listed in quantization_config's "
                     f"{scheme.skip_key}")
    return replace(plan, tensors=tensors, config=config, notes=notes)


def _is_weight(tensor: OutputTensor) -> bool:
    """A matrix (or stack of them) a quantized module would hold quantized: not a bias."""
    return len(tensor.shape) >= 2 and "bias" not in tensor.name.rsplit(".", 1)[-1]


def _selects(recipe: Recipe) -> bool:
    """Whether `recipe` only copies stored values (whole tensors, rows, columns, pieces joined)."""
    if isinstance(recipe, (Copy, Rows, Columns)):
        return True
    return isinstance(recipe, (Joined, Concat)) and all(_selects(item) for item in recipe.items)


def _same_scheme(checkpoint, scheme) -> bool:
    other = checkpoint.quantization
    ignore = ("modules_to_not_convert", "ignore")
    return other is not None and type(other) is type(scheme) and \
        {k: v for k, v in other.config.items() if k not in ignore} == \
        {k: v for k, v in scheme.config.items() if k not in ignore}


def _rename(tensor: OutputTensor, scheme, renames: dict) -> None:
    recipe = tensor.recipe
    if isinstance(recipe, Copy) and recipe.rows is None:
        renames.setdefault(scheme.module_of(recipe.name), scheme.module_of(tensor.name))


def _parts(tensor: OutputTensor, scheme) -> list[OutputTensor] | None:
    """The output tensor as its scheme's parts, each a byte-copy recipe over the source's stored parts; None where
    a part cannot be copied (the blocks do not allow it)."""
    info = _logical(tensor.recipe)
    if info is None:
        return None
    layout = scheme.part_layout(info, tensor.shape)
    if layout is None:
        return None
    names = scheme.stored_names(tensor.name, info)
    out = []
    for role, (dtype, shape) in layout.items():
        recipe = _over_part(tensor.recipe, role, scheme)
        if recipe is None or _numel(recipe) != math.prod(shape):
            return None
        if isinstance(recipe, Copy) and recipe.rows is not None and _shape(recipe) != tuple(shape):
            recipe = Joined([recipe], tuple(shape))  # a block of rows of a part stored with more dimensions
        out.append(OutputTensor(names[role], shape, dtype, recipe))
    return out


def _logical(recipe: Recipe):
    """The header of the (first) logical weight `recipe` copies, if it only copies logical weights."""
    if isinstance(recipe, (Copy, Rows)):
        info = recipe.checkpoint.info(recipe.name)
        return info if info.parts else None
    if isinstance(recipe, Joined) and recipe.items:
        infos = [_logical(item) for item in recipe.items]
        return infos[0] if all(infos) else None
    return None


def _over_part(recipe: Recipe, role: str, scheme) -> Recipe | None:
    """`recipe` over part `role` of the logical weights it copies."""
    if isinstance(recipe, Copy):
        info = recipe.checkpoint.info(recipe.name)
        part = dict(info.parts)[role]
        if recipe.rows is None:
            return Copy(recipe.checkpoint.stored, part.name)
        rows = scheme.part_rows(info.shape, role, *recipe.rows)
        return None if rows is None else Copy(recipe.checkpoint.stored, part.name, rows)
    if isinstance(recipe, Rows):
        info = recipe.checkpoint.info(recipe.name)
        if len(info.shape) < 3:
            return None  # rows of a matrix cut through its blocks
        return Rows(recipe.checkpoint.stored, dict(info.parts)[role].name, list(recipe.rows))
    if isinstance(recipe, Joined):
        out_shape = recipe.shape
        items = []
        for item in recipe.items:
            if not scheme.joinable(_shape(item), out_shape):
                return None
            over = _over_part(item, role, scheme)
            if over is None:
                return None
            items.append(over)
        layout_shape = scheme.part_layout(_logical(recipe), out_shape)[role][1]
        return Joined(items, layout_shape)
    return None


def _shape(recipe: Recipe) -> tuple[int, ...]:
    if isinstance(recipe, Copy):
        return tuple(recipe.stored_shape())
    if isinstance(recipe, Rows):
        return (len(recipe.rows),) + tuple(recipe.checkpoint.info(recipe.name).shape[1:])
    if isinstance(recipe, Joined):
        return tuple(recipe.shape)
    return ()


def _numel(recipe: Recipe) -> int:
    return math.prod(_shape(recipe))
