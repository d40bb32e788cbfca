"""Expert layouts: how an MoE checkpoint stores its experts, and converting a plan from one to the other.

* ``per-expert``: one tensor per expert and role (``block_sparse_moe.experts.3.w1.weight``); what
  llama.cpp's converter and vLLM read, and the default of every writing command.
* ``fused``: transformers 5's layout (``save_pretrained(..., save_original_format=False)``): one
  ``mlp.experts.gate_up_proj`` [E, 2I, H] (each expert's gate rows, then its up rows) and one
  ``mlp.experts.down_proj`` [E, H, I] per layer; Mixtral's router is then ``mlp.gate.weight``.
  The family's ``fused_experts`` rows and ``FUSED_PARTS`` say which per-expert roles a fused tensor
  stacks, in which order.

Both directions are byte rearrangements: a fused tensor is its per-expert parts back to back
(``Joined``, written part after part, kernel copies where the bytes are unchanged), and a per-expert
tensor is a contiguous block of rows of the fused one (``Copy(rows=...)``). So a round trip
reproduces every byte, and neither direction holds more than one part in memory.
"""

from __future__ import annotations

from dataclasses import replace

from surgery import families as arch
from surgery.errors import SurgeryError, check_choice
from surgery.plan.nodes import Copy, Joined
from surgery.plan.plan import OutputTensor, Plan

LAYOUTS = {"per-expert": "per_expert", "fused": "fused"}  # --layout value -> families' layout name


def keep_source_layout(output, family, source_tensors):
    """`output` (OutputOptions) with ``--layout keep`` settled to the layout the source MoE stores its experts in,
    for operations that build their plan in one layout and convert it (prune, add-experts)."""
    if output.layout != "keep":
        return output
    stored = arch.detect_expert_layout(family, source_tensors)
    return replace(output, layout=next(value for value, name in LAYOUTS.items() if name == stored))


def convert(plan: Plan, layout: str) -> Plan:
    """`plan` writing its experts in `layout` (keep, per-expert or fused); the plan itself when it already does."""
    if layout == "keep" or plan.config is None:
        return plan
    check_choice("--layout", layout, ("keep", *LAYOUTS))
    family = arch.detect_family(plan.config, "the output's config.json")
    names = [tensor.name for tensor in plan.tensors]
    if family.kind != "moe" or not family.fused_experts:
        if layout == "fused":
            raise SurgeryError(f"--layout fused: the output is a {family.architecture}, which has no experts to fuse")
        return plan
    current, wanted = arch.detect_expert_layout(family, names), LAYOUTS[layout]
    if wanted not in family.stored_layouts:  # GraniteMoE has no per-expert layout: always fused
        wanted = family.stored_layouts[0]
    if current == wanted:
        return plan
    groups = _fused_groups(family, plan.config)
    tensors = _to_fused(plan.tensors, groups) if wanted == "fused" else _to_per_expert(plan.tensors, groups)
    return Plan(plan.operation, tensors, plan.config, plan.sources, plan.side_files, plan.extra_files, plan.metadata,
                plan.notes, plan.rounding, plan.details)


def _fused_groups(family, config) -> list[tuple]:
    """[(fused Expected, [per-expert Expected in byte order])] of every fused expert tensor, and the router
    renames [(fused router Expected, [per-expert router Expected])], in model order."""
    fused = arch.expected_tensors(family, config, "fused")
    per_expert = arch.expected_tensors(family, config, "per_expert")
    by_key = {(e.group, e.role, e.layer, e.expert): e for e in per_expert.values()}
    groups = []
    for expected in fused.values():
        if expected.group == "experts":
            parts = [by_key[("experts", role, expected.layer, expert)]
                     for expert in range(expected.shape[0]) for role in family.fused_parts[expected.role]]
            groups.append((expected, parts))
        elif expected.group == "router" and expected.name not in per_expert:  # renamed: same bytes
            groups.append((expected, [by_key[("router", expected.role, expected.layer, None)]]))
    return groups


def _to_fused(tensors: list[OutputTensor], groups) -> list[OutputTensor]:
    by_name = {tensor.name: tensor for tensor in tensors}
    replaced = {}  # name of a group's first part -> the fused tensor; other parts -> None
    for fused, parts in groups:
        pieces = [by_name[part.name] for part in parts]
        dtypes = {piece.dtype for piece in pieces}
        if len(dtypes) != 1:
            raise AssertionError(f"{fused.name}: parts in several dtypes {sorted(dtypes)}")
        recipe = pieces[0].recipe if len(pieces) == 1 else Joined([piece.recipe for piece in pieces], fused.shape)
        replaced[pieces[0].name] = OutputTensor(fused.name, fused.shape, pieces[0].dtype, recipe)
        for piece in pieces[1:]:
            replaced[piece.name] = None
    out = []
    for tensor in tensors:
        if tensor.name not in replaced:
            out.append(tensor)
        elif replaced[tensor.name] is not None:
            out.append(replaced[tensor.name])
    return out


def _to_per_expert(tensors: list[OutputTensor], groups) -> list[OutputTensor]:
    by_name = {tensor.name: tensor for tensor in tensors}
    split = {}
    for fused, parts in groups:
        tensor = by_name[fused.name]
        if len(parts) == 1 and fused.group == "router":  # a renamed router: same bytes
            split[fused.name] = [OutputTensor(parts[0].name, parts[0].shape, tensor.dtype, tensor.recipe)]
            continue
        recipe = tensor.recipe
        if not isinstance(recipe, Copy) or recipe.rows is not None:
            raise AssertionError(f"{fused.name}: only a stored fused tensor can be split into experts")
        if tuple(recipe.stored_shape()) != tuple(fused.shape):
            raise SurgeryError(f"{recipe.checkpoint.info(recipe.name).file}: tensor {recipe.name!r} has shape "
                               f"{list(recipe.stored_shape())}, config.json implies {list(fused.shape)}")
        pieces, row = [], 0
        for part in parts:  # each part is a block of rows of the fused tensor viewed as 2-D
            rows = part.shape[0]
            pieces.append(OutputTensor(part.name, part.shape, tensor.dtype, Copy(recipe.checkpoint, recipe.name,
                                                                               (row, row + rows))))
            row += rows
        split[fused.name] = pieces
    return [piece for tensor in tensors for piece in split.get(tensor.name, [tensor])]


def expert_parts(source, family, config: dict, layout: str) -> dict:
    """{(role, layer, expert): a byte-copy recipe of that expert's part in `source`, stored in `layout`
    (per_expert: its own tensor; fused: its block of rows of the fused tensor)}."""
    if layout == "per_expert":
        return {(e.role, e.layer, e.expert): Copy(source, e.name)
                for e in arch.expected_tensors(family, config, "per_expert").values() if e.group == "experts"}
    pieces = {}
    for fused, parts in _fused_groups(family, config):
        row = 0
        for part in parts if fused.group == "experts" else ():
            pieces[(part.role, part.layer, part.expert)] = Copy(source, fused.name, (row, row + part.shape[0]))
            row += part.shape[0]
    return pieces
