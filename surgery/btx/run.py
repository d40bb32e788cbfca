"""Running a merge: the plan written by the streaming writer; with calibrated routers (or RegMean), as a draft
whose deferred tensors are fitted by running it (and its members) layer by layer before it becomes the output.

Memory: the zero, normal and embedding inits stream (about one tensor in memory, like every plan). The
calibrated init writes the merge as a draft beside OUT with its routers deferred, runs the draft layer by
layer (``surgery.btx.routers.fit_calibrated``) and writes the fitted rows into it before it becomes OUT: peak
memory is one merged decoder layer in the compute dtype plus the calibration hidden states, and every weight
is read and averaged once.
"""

from __future__ import annotations

from pathlib import Path

from surgery import console
from surgery.btx.card import model_card
from surgery.btx.members import Merge
from surgery.btx.plan import RegMeanSlot, build_plan
from surgery.errors import SurgeryError
from surgery.execution.loading import import_in_background
from surgery.execution.settings import RunSettings
from surgery.io.checkpoint import Checkpoint
from surgery.operations.output import OutputOptions, PostWriteCheck, write
from surgery.plan.layouts import convert
from surgery.plan.nodes import Deferred, RouterSlot
from surgery.plan.plan import Plan
from surgery.writer.deferred import Filled
from surgery.writer.stream import check_output_path


def run_merge(merge: Merge, out: Path, output: OutputOptions = OutputOptions(), settings=None):
    """Write the merge (calibrated routers: fitted on the written draft); returns a ``Result``."""
    output.check()
    settings = settings or RunSettings()
    automatic = merge.spec.head_fit is None
    merge.spec.head_fit = bool(merge.spec.head_fit)
    plan = convert(build_plan(merge), output.layout)  # before the deferred routers are named
    regmean_head = any(isinstance(t.recipe, Deferred) and isinstance(t.recipe.slot, RegMeanSlot) and t.recipe.slot.layer
                       is None for t in plan.tensors)
    if merge.spec.head_fit and not regmean_head:
        if merge.config.get("tie_word_embeddings"):
            raise SurgeryError(f"--head-fit: {merge.reference.checkpoint.directory} ties its head to the embedding "
                               "(tie_word_embeddings), so there is no separate head to refit")
        raise SurgeryError("--head-fit refits a RegMean++ head, and only one model's non-FFN weights are averaged "
                           "here (--weights), so the head is that model's copy")
    if automatic and regmean_head and merge.spec.non_ffn == "regmean++" and head_fit_affordable(merge, settings):
        merge.spec.head_fit = True
        plan = convert(build_plan(merge), output.layout)  # its head's recipe says it is refitted
    unique = {m.checkpoint.directory.resolve(): m.checkpoint.path for m in reversed(merge.members)}
    sources = [unique[key] for key in dict.fromkeys(m.checkpoint.directory.resolve() for m in merge.members)]
    check = PostWriteCheck(sources, exact=False, settings=settings)
    if not any(isinstance(t.recipe, Deferred) for t in plan.tensors) or output.dry_run:
        return write(plan, out, output, check=check)
    return _run_calibrated(merge, plan, Path(out), output, check)


def head_fit_affordable(merge: Merge, settings: RunSettings) -> bool:
    """--head-fit auto, for a merge whose head RegMean++ fits: whether the fit's cost, from the config alone (so
    --dry-run shows the decision), is within what ``head_fit.auto_skip_reason`` allows on the device the merge
    runs on; a fit skipped is said, with why and how to run it."""
    from surgery.btx.head_fit import auto_skip_reason  # lazy: a calibrated merge's planning; imports torch
    from surgery.execution.placement import free_gpu_memory  # lazy: as above

    device = settings.placement().device
    free = None
    if device.startswith("cuda"):
        free = free_gpu_memory()[int(device.partition(":")[2] or 0)]
    reason = auto_skip_reason(int(merge.config["vocab_size"]), int(merge.config["hidden_size"]), len(merge.experts),
                              merge.spec.calibration_tokens, device, free)
    if reason is None:
        return True
    console.note(f"head fit skipped (auto): {reason}; --head-fit runs it, --no-head-fit skips it quietly")
    return False


def _run_calibrated(merge: Merge, plan: Plan, out: Path, output: OutputOptions, check: PostWriteCheck):
    """Write the merge with its data-fitted tensors deferred, then fill them in on the draft: RegMean's linear
    layers (each model run on its own text), then the routers (the merged draft run layer by layer). Every
    weight is read and computed once."""
    from surgery.btx.regmean import MergedInputs, fit_regmean, regmean_tensors, set_token_counts  # lazy: runs models
    from surgery.btx.routers import calibration_parts, fit_calibrated, print_routing, routing_table_text  # lazy: same
    from surgery.execution.calibration import CalibrationSet  # lazy: a plain merge never imports torch
    from surgery.execution.weights import ModelWeights  # lazy: as above

    check_output_path(out, plan.sources, output.force)
    parts = calibration_parts(merge)  # a bad calibration text is refused before writing
    set_token_counts(merge, plan, parts)
    names = {d.expert: d.name for d in merge.domains()}
    routers = {t.name: t.recipe.slot for t in plan.tensors
               if isinstance(t.recipe, Deferred) and isinstance(t.recipe.slot, RouterSlot)}

    def fill(draft: Path, patch) -> Filled:
        importing.join(timeout=120)  # no import of the same modules from two threads at once
        plus = merge.spec.non_ffn == "regmean++"
        if regmean_tensors(plan) and not plus:
            fit_regmean(merge, plan, parts, check.settings, patch, spill_dir=out.resolve().parent)
        if not routers and not plus:
            return Filled({})
        announce = (f"calibrated routers: running the merged model layer by layer on {len(names)} domains "
                    f"({', '.join(names.values())}) and fitting {len(routers)} routers"
                    + (" and shared-expert gates" if merge.shared_gate == "fitted" else ""))
        with Checkpoint.open(draft) as checkpoint:
            merged_inputs = MergedInputs(merge, plan, CalibrationSet.combine(parts), check.settings, patch,
                                         out.resolve().parent) if plus else None
            fit = fit_calibrated(merge, ModelWeights.from_checkpoint(checkpoint), parts, check.settings,
                                 spill_dir=out.resolve().parent, merged_inputs=merged_inputs, announce=announce)
        domain_names = [names[e] for e in sorted(names)]
        expert_names = [m.name for m in merge.experts]
        print_routing(fit, domain_names, expert_names)
        card = model_card(merge, routing_table_text(fit, domain_names, expert_names))
        return Filled({name: fit.rows(r.kind)[r.layer] for name, r in routers.items()}, {"README.md": card})

    importing = import_in_background(merge.config["model_type"])  # while the draft is written
    return write(plan, out, output, check=check, fill=fill)
