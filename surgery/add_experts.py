"""`surgery add-experts`: MoE + dense models -> MoE with each dense model's FFN as a new routed expert.

Every MoE layer gets one new routed expert per `--expert NAME=DENSE`, appended after the existing ones, a byte
copy of the dense model's FFN of that layer (``surgery.experts.add_plan``); its router row is fitted on
`--calibration NAME=FILE` at the router input of the written model (``surgery.experts.add_routers``).
Existing experts, router rows and shared experts are byte copies; non-FFN weights are the MoE's or, with
``--non-ffn average``, their mean with the dense models'.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import click

from surgery import families as arch
from surgery.errors import SurgeryError, check_choice
from surgery.execution.settings import RunOptions
from surgery.experts.add_plan import build_plan, check_dense
from surgery.io.checkpoint import Checkpoint
from surgery.operations.options import calibration_options, run_options, unique_pairs
from surgery.operations.output import OutputOptions, output_options, write
from surgery.plan.layouts import convert, keep_source_layout
from surgery.plan.sources import moe_family

NON_FFN = ("keep", "average")  # --non-ffn: the MoE's non-FFN weights, or their mean with the dense models'


@dataclass(frozen=True)
class AddExpertsOptions(RunOptions):
    expert: tuple = ()
    calibration: tuple = ()
    calibration_tokens: int = 2048
    non_ffn: str = "keep"

    def experts(self) -> dict[str, str]:
        return unique_pairs(self.expert, "--expert", "PATH")

    def calibrations(self) -> dict[str, str]:
        return unique_pairs(self.calibration, "--calibration", "PATH")

    def check(self) -> None:
        experts, calibrations = self.experts(), self.calibrations()
        if not experts:
            raise SurgeryError("give at least one --expert NAME=DENSE")
        check_choice("--non-ffn", self.non_ffn, NON_FFN)
        for name in calibrations:
            if name not in experts:
                raise SurgeryError(f"--calibration {name}=...: no --expert {name}=DENSE")
        for name in experts:
            if name not in calibrations:
                raise SurgeryError(f"--expert {name}: give --calibration {name}=FILE (text or token ids); the new "
                                   f"router row is fitted on it, and an unfitted row would never be chosen")
        self.run.check()


@click.command("add-experts")
@click.argument("moe", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--expert", multiple=True, metavar="NAME=DENSE",
              help="A dense model (of a family that converts into the MoE's, with its shapes) whose FFN becomes a "
                   "new expert; repeatable.")
@calibration_options(AddExpertsOptions, multiple=True, metavar="NAME=FILE", tokens="Calibration tokens per new expert.",
                     calibration="Text or token ids (.npy/.pt/.jsonl) of expert NAME's domain; its router row is "
                                 "fitted on it.")
@click.option("--non-ffn", default="keep", show_default=True, type=click.Choice(NON_FFN),
              help="Non-FFN weights (attention, norms, embeddings, head): the MoE's (keep), or the element-wise "
                   "mean of the MoE's and every dense model's in float32 (average; the new router rows are then "
                   "fitted on the averaged model).")
@run_options
@output_options(verify=False, layout="keep")
def command(moe, out, output, **options):
    """Add each dense model's FFN as a new routed expert in every MoE layer of MOE; write OUT."""
    run(moe, out, AddExpertsOptions(**options), output)


def run(moe, out, options: AddExpertsOptions, output: OutputOptions = OutputOptions(layout="keep")):
    """MoE -> MoE: each dense model of `expert` ({NAME: DENSE} or NAME=DENSE strings) adds its FFN as a new routed
    expert in every MoE layer, its router row fitted on `calibration` ({NAME: FILE}; docs/add-experts.md). Returns
    a ``Result`` (``result.plan.details["add_experts"]``)."""
    from surgery.execution.calibration import CalibrationSet  # lazy: tokenising imports torch (not for --help)

    output.check()
    options.check()
    experts, calibrations = options.experts(), options.calibrations()
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(Checkpoint.open(moe, require_config=True))
        family = moe_family(source, "add-experts")
        denses, ffns = {}, {}
        for name, path in experts.items():
            denses[name] = stack.enter_context(Checkpoint.open(path, require_config=True))
            ffns[name] = check_dense(source, family, denses[name], name)
        count = arch.dimensions(family, source.config)["experts"]
        parts, added, notes = [], [], []
        for index, name in enumerate(experts):  # a bad text is refused before anything is written
            part = CalibrationSet.load(calibrations[name], source.directory, source.config, options.calibration_tokens)
            parts.append((index, part))
            added.append({"name": name, "index": count + index, "dense": str(denses[name].path),
                          "calibration": part.source, "tokens": part.tokens})
        if len(experts) > 1:
            notes.append("each new row is fitted against the existing rows only, not against the other new rows")
        details = {"experts": count, "added": added, "non_ffn": options.non_ffn}
        output = keep_source_layout(output, family, source.tensors)
        plan = convert(build_plan(source, family, denses, ffns, details, notes), output.layout)
        if output.dry_run:
            return write(plan, out, output)
        from surgery.experts.add_routers import fill_routers  # lazy: runs the model (not for --help)

        fill = fill_routers(source, family, plan, CalibrationSet.combine(parts), options.run,
                            Path(out).resolve().parent, details, notes)
        return write(plan, out, output, fill=fill)
