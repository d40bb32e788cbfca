"""`surgery extract`: MoE -> dense, one FFN per layer made from the routed experts (docs/extract.md).

The output is the MoE family's dense form (``Family.dense_form``): its dense counterpart, the same family with every
layer dense, or a refusal that says why transformers has neither.

``--expert E`` keeps expert E's FFN (byte copies); ``--average uniform|frequency`` averages the experts' weights
(frequency: weighted by each one's share of routed tokens on the calibration text, from ``surgery prune``'s
scoring pass). A gated shared expert needs ``--shared-gate fold|drop``. The plan is
``surgery.experts.extract_plan``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from surgery import families as arch
from surgery.errors import SurgeryError, check_choice
from surgery.execution.settings import RunOptions
from surgery.experts.extract_plan import build_plan, describe, layer_weights, shared_rule
from surgery.families.convert import extract_target
from surgery.io.checkpoint import Checkpoint
from surgery.operations.options import calibration_options, run_options
from surgery.operations.output import OutputOptions, PostWriteCheck, output_options, write
from surgery.plan.sources import moe_family

AVERAGES = ("uniform", "frequency")
SHARED_GATES = ("fold", "drop")


@dataclass(frozen=True)
class ExtractOptions(RunOptions):
    expert: int | None = None
    average: str | None = None
    shared_gate: str | None = None
    calibration: str | None = None
    calibration_tokens: int = 2048

    def check(self) -> None:
        if (self.expert is None) == (self.average is None):
            raise SurgeryError("give one of --expert E and --average uniform|frequency")
        if self.average is not None:
            check_choice("--average", self.average, AVERAGES)
        if self.shared_gate is not None:
            check_choice("--shared-gate", self.shared_gate, SHARED_GATES)
        if self.calibration is not None and self.average != "frequency":
            raise SurgeryError("--calibration applies to --average frequency only")
        self.run.check()


@click.command("extract")
@click.argument("moe", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--expert", type=int, default=None, help="The routed expert whose FFN every MoE layer keeps.")
@click.option("--average", type=click.Choice(AVERAGES), default=None,
              help="Average the experts' weights: uniform, or weighted by each expert's share of routed tokens on "
                   "the calibration text (frequency).")
@click.option("--shared-gate", type=click.Choice(SHARED_GATES), default=None,
              help="A gated shared expert (qwen2_moe): fold its neurons in, scaled by sigmoid(0) = 0.5, or drop it "
                   "[default for an ungated one: fold, exactly].")
@calibration_options(ExtractOptions, metavar="FILE", tokens="Calibration tokens the routing pass runs.",
                     calibration="--average frequency: calibration text or token ids (.npy/.pt/.jsonl) [default: "
                                 "the shipped sample text].")
@run_options
@output_options
def command(moe, out, output, **options):
    """Turn MOE into a dense checkpoint of its source family; write OUT."""
    run(moe, out, ExtractOptions(**options), output)


def run(moe, out, options: ExtractOptions, output: OutputOptions = OutputOptions()):
    """MoE -> dense: every MoE layer's FFN becomes one routed expert's (`expert`) or the experts' weights averaged
    (`average` uniform or frequency; docs/extract.md). Returns a ``Result`` (``result.plan.details["extract"]``:
    each layer's expert weights)."""
    output.check()
    options.check()
    with Checkpoint.open(moe, require_config=True) as source:
        where = source.directory / "config.json"
        family = moe_family(source, "extract")
        dense = extract_target(family, source.directory)
        dims = arch.dimensions(family, source.config, where)
        if not arch.moe_layers(family, source.config):
            raise SurgeryError(f"{source.directory}: extract: this {family.architecture} has no MoE layer; every layer "
                               f"is dense already")
        if options.expert is not None and not 0 <= options.expert < dims["experts"]:
            raise SurgeryError(f"--expert {options.expert}: the source has experts 0-{dims['experts'] - 1} per MoE "
                               f"layer")
        shared = shared_rule(family, source.config, options)
        frequencies = None
        if options.average == "frequency":
            from surgery.experts.scoring import calibrated_scores  # lazy: runs the model (not for --help)

            frequencies = calibrated_scores(source, family, options.calibration, options.calibration_tokens,
                                            options.run)
        weights = layer_weights(family, source.config, options, frequencies)
        details = {"expert": options.expert, "average": options.average, "shared_gate": shared,
                   "dense_family": dense.name,
                   "every_layer_dense": dense.dense_form.keys({**dense.defaults, **source.config})
                   if dense is family else None,
                   "calibration": frequencies["calibration"] if frequencies else None,
                   "tokens": frequencies["tokens"] if frequencies else None,
                   "layers": {layer: {"weights": values} for layer, values in weights.items()}}
        plan = build_plan(source, family, dense, weights, shared, details, [])
        plan.notes.extend(describe(options, family, dense, shared, frequencies, source.config))
        if plan.config["intermediate_size"] > dims["expert_ffn"] + (dims.get("shared_ffn") or 0) * (shared == "fold"):
            plan.notes.append(f"intermediate_size {plan.config['intermediate_size']}: the widest FFN; narrower ones "
                              f"get zero neurons, which add nothing")
        return write(plan, out, output, check=PostWriteCheck([moe], exact=False, settings=options.run))
