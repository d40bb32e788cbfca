"""An output nested again in the multimodal checkpoint its source was read from (``surgery.families.nesting``).

Operations plan the text model a nested source holds (its config, its tensors' text-model names). ``nest`` turns
such a plan into what is written: the tensors under their stored names, the text config nested in the source's
whole config, and the other towers' tensors (the vision encoder and projector) copied as bytes. An output of
another family than the source's text model (none today) is written as planned.
"""

from __future__ import annotations

from dataclasses import replace

from surgery import families as arch
from surgery.plan.nodes import Copy
from surgery.plan.plan import OutputTensor, Plan
from surgery.units import format_bytes


def nest(plan: Plan) -> Plan:
    source = next((source for source in plan.sources if source.nesting is not None), None)
    if source is None or plan.config is None:
        return plan
    nesting = source.nesting
    if arch.detect_family(plan.config, "the output's config.json").name != nesting.text:
        return plan
    tensors = [replace(tensor, name=nesting.stored_name(tensor.name)) for tensor in plan.tensors]
    carried = [OutputTensor(name, tuple(info.shape), info.dtype, Copy(source, name))
               for name, info in source.carried.items()]
    notes = list(plan.notes)
    if carried:
        size = format_bytes(sum(tensor.nbytes for tensor in carried))
        notes.append(f"written as the source's {nesting.architecture}: the text model under its stored names, and "
                     f"the other towers' {len(carried)} tensors ({size}: "
                     + ", ".join(prefix.rstrip(".") for prefix in nesting.carried) + ") copied as bytes")
    return replace(plan, tensors=tensors + carried, config=nesting.nest_config(source.stored_config, plan.config),
                   notes=notes)
