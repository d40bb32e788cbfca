"""`surgery extract`: MoE -> dense, one FFN per layer made from the routed experts (docs/extract.md).

The dense family is the one the MoE family is made from (``families.dense_family``: Mixtral -> Mistral,
Qwen2-MoE -> Qwen2, Qwen3-MoE -> Qwen3, FlexOlmo -> OLMo 2, GraniteMoE(Shared) -> Granite). Per MoE layer
the dense FFN is

* ``--expert E``: expert E's gate/up/down, byte copies (either stored layout);
* ``--average uniform``: the mean of the experts' weights (not the mean of their outputs);
* ``--average frequency``: the experts' weights averaged with each one's share of routed tokens on the
  calibration text (``surgery.prune_scores``' pass), per layer.

A shared expert's neurons are appended (gate/up rows, down columns) with its down columns scaled by the
share of its output the model adds (``--shared-gate fold``: the family's ``shared_scale``, sigmoid(0) =
0.5 for Qwen2-MoE's gate, exact only where the gate's weights are zero; 1 for an ungated one, exact), or
left out (``--shared-gate drop``). A gated shared expert needs the flag. Dense layers are copied, zero
neurons appended where the extracted FFN is wider. Everything else is copied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import click

from surgery import families as arch
from surgery.checkpoint import Checkpoint
from surgery.moe_plan import moe_family
from surgery.errors import SurgeryError
from surgery.execution.session import RunsModel, run_options
from surgery.families.convert import dense_config, dense_family
from surgery.operations.output import OutputOptions, PostWriteCheck, check_choice, output_options, write
from surgery.plan import OutputTensor, Plan
from surgery.recipes import Concat, Copy, PadRows, Recipe, Scale, WeightedMean

AVERAGES = ("uniform", "frequency")
SHARED_GATES = ("fold", "drop")
CALIBRATION_TOKENS = 2048


@dataclass(frozen=True)
class ExtractOptions(RunsModel):
    expert: int | None = None
    average: str | None = None
    shared_gate: str | None = None
    calibration: str | None = None
    calibration_tokens: int = CALIBRATION_TOKENS
    device: str = "auto"
    memory_budget: str | None = None
    compute_dtype: str = "auto"

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


# ------------------------------------------------------------------ the shared expert
def shared_rule(family, config: dict, options: ExtractOptions) -> str | None:
    """'fold', 'drop', or None where the source has no shared expert; a gated one needs --shared-gate."""
    if not family.shared_expert or not arch.dimensions(family, config).get("shared_ffn"):
        if options.shared_gate is not None:
            raise SurgeryError(f"--shared-gate {options.shared_gate}: the source has no shared expert")
        return None
    gated = any(spec.role == "shared_gate" for spec in family.shared_expert)
    if options.shared_gate is None and gated:
        raise SurgeryError(f"{family.architecture}'s shared expert is scaled by sigmoid(x . gate), which a dense FFN "
                           f"cannot compute: give --shared-gate fold (scale it by {family.shared_scale:g}, exact where "
                           f"the gate's weights are zero) or --shared-gate drop (leave it out)")
    return options.shared_gate or "fold"


# ------------------------------------------------------------------ the plan
def layer_weights(family, config: dict, options: ExtractOptions, frequencies) -> dict[int, list[float]]:
    """{MoE layer: the weight of each expert in its dense FFN} (one-hot for --expert)."""
    from surgery.prune_scores import moe_layers

    experts = arch.dimensions(family, config)["experts"]
    if options.expert is not None:
        return {layer: [1.0 if e == options.expert else 0.0 for e in range(experts)]
                for layer in moe_layers(family, config)}
    if options.average == "uniform":
        return {layer: [1.0] * experts for layer in moe_layers(family, config)}
    return {layer: list(frequencies["layers"][layer]["frequency"]) for layer in moe_layers(family, config)}


def _combined(pieces: dict, role: str, layer: int, weights: list[float]) -> Recipe:
    """One expert's piece (a byte copy) where a single weight is non-zero, else the weighted mean."""
    used = [(weight, pieces[(role, layer, expert)]) for expert, weight in enumerate(weights) if weight]
    if len(used) == 1:
        return used[0][1]
    return WeightedMean([recipe for _, recipe in used], [weight for weight, _ in used])


def build_plan(source: Checkpoint, family, dense, weights: dict[int, list[float]], shared: str | None,
               details: dict, notes: list[str]) -> Plan:
    from surgery.layouts import expert_parts

    config = source.config
    where = source.directory / "config.json"
    layout = arch.detect_expert_layout(family, source.tensors)
    dims = arch.dimensions(family, config, where)
    shared_ffn = dims.get("shared_ffn") or 0 if shared == "fold" else 0
    extracted = dims["expert_ffn"] + shared_ffn
    dense_sizes = [dims["ffn"]] if len(weights) < dims["layers"] else []
    size = max([extracted] + dense_sizes)
    new_config = dense_config(family, config, dense, size, where)
    known = arch.expected_tensors(family, config, layout, where)
    extra = [name for name in source.tensors if name not in known]
    if extra:
        raise SurgeryError(f"{source.directory}: tensor {extra[0]!r} is not part of a {family.architecture} "
                           f"checkpoint with this config.json; extract would drop it")
    pieces = expert_parts(source, family, config, layout)
    views = {name: (stored, (start, stop)) for name, (stored, start, stop) in arch.source_views(family, config).items()}
    tensors = []
    for expected in arch.expected_tensors(dense, new_config, "per_expert", "the output's config.json").values():
        if expected.group != "ffn":
            recipe = Copy(source, expected.name)
        elif expected.layer in weights:
            recipe = _combined(pieces, expected.role, expected.layer, weights[expected.layer])
            if shared == "fold":
                name = family.spec("shared_expert", expected.role).name(expected.layer)
                part = Copy(source, *views[name]) if name in views else Copy(source, name)
                if expected.role == "down" and family.shared_scale != 1.0:
                    part = Scale(part, family.shared_scale)
                recipe = Concat([recipe, part], dim=1 if expected.role == "down" else 0)
        else:
            recipe = Copy(source, family.spec("ffn", expected.role).name(expected.layer))
            stored = source.info(recipe.name).shape
            if list(stored) != list(expected.shape):
                recipe = PadRows(recipe, size, dim=-1 if expected.role == "down" else 0)
        if expected.group == "ffn" and expected.layer in weights and size > extracted:
            recipe = PadRows(recipe, size, dim=-1 if expected.role == "down" else 0)
        dtype = source.info(recipe.inputs()[0][1]).dtype
        tensors.append(OutputTensor(expected.name, expected.shape, dtype, recipe))
    metadata = {"surgery_sources": json.dumps([str(source.path)]), "surgery_extract": json.dumps(details)}
    return Plan("extract", tensors, new_config, [source], side_files=source.side_files(), metadata=metadata,
                notes=notes, details={"extract": details})


def describe(options: ExtractOptions, family, dense, shared: str | None, frequencies) -> list[str]:
    """The notes of a run: what the dense FFN is, true of this run."""
    notes = []
    if options.expert is not None:
        notes.append(f"{family.name} -> {dense.name}: every MoE layer's FFN is expert {options.expert}'s (byte copies)")
    else:
        notes.append(f"{family.name} -> {dense.name}: every MoE layer's FFN is the "
                     + ("mean" if options.average == "uniform" else "routing-frequency-weighted mean")
                     + " of the experts' weights, not of their outputs: the extract computes something else than "
                       "the MoE"
                     + (f" (frequencies from {frequencies['calibration']}, {frequencies['tokens']} tokens)"
                        if frequencies else ""))
    if shared == "fold":
        notes.append(f"the shared expert's neurons are appended to each MoE layer's FFN, its down_proj scaled by "
                     f"{family.shared_scale:g}" + (" (its gate's sigmoid at 0: exact only where the gate's weights "
                                                   "are zero)" if family.shared_scale != 1.0 else " (exact)"))
    elif shared == "drop":
        notes.append("the shared expert is left out (--shared-gate drop)")
    return notes


# ------------------------------------------------------------------ command and API
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
@click.option("--calibration", default=None, metavar="FILE",
              help="--average frequency: calibration text or token ids (.npy/.pt/.jsonl) [default: the shipped "
                   "sample text].")
@click.option("--calibration-tokens", default=CALIBRATION_TOKENS, show_default=True, type=click.IntRange(2),
              help="Calibration tokens the routing pass runs.")
@run_options
@output_options
def command(moe, out, output, **options):
    """Turn MOE into a dense checkpoint of its source family; write OUT."""
    run(moe, out, ExtractOptions(**options), output)


def run(moe, out, options: ExtractOptions, output: OutputOptions = OutputOptions()):
    """Extract a dense model from MOE into OUT (the command and ``surgery.extract`` both land here)."""
    from surgery import prune_scores

    output.check()
    options.check()
    with Checkpoint.open(moe, require_config=True) as source:
        where = source.directory / "config.json"
        family = moe_family(source, "extract")
        dense = dense_family(family, where)
        dims = arch.dimensions(family, source.config, where)
        if options.expert is not None and not 0 <= options.expert < dims["experts"]:
            raise SurgeryError(f"--expert {options.expert}: the source has experts 0-{dims['experts'] - 1} per MoE "
                               f"layer")
        shared = shared_rule(family, source.config, options)
        frequencies = None
        if options.average == "frequency":
            frequencies = prune_scores.calibrated_scores(source, family, options.calibration,
                                                         options.calibration_tokens, options.run)
        weights = layer_weights(family, source.config, options, frequencies)
        details = {"expert": options.expert, "average": options.average, "shared_gate": shared,
                   "dense_family": dense.name,
                   "calibration": frequencies["calibration"] if frequencies else None,
                   "tokens": frequencies["tokens"] if frequencies else None,
                   "layers": {layer: {"weights": values} for layer, values in weights.items()}}
        plan = build_plan(source, family, dense, weights, shared, details, [])
        plan.notes.extend(describe(options, family, dense, shared, frequencies))
        if plan.config["intermediate_size"] > dims["expert_ffn"] + (dims.get("shared_ffn") or 0) * (shared == "fold"):
            plan.notes.append(f"intermediate_size {plan.config['intermediate_size']}: the widest FFN; narrower ones "
                              f"get zero neurons, which add nothing")
        return write(plan, out, output, check=PostWriteCheck([moe], exact=False, settings=options.run))


# `surgery.extract(...)`: this module is also the API function (surgery.api.extract)
from surgery.api import callable_module  # noqa: E402

callable_module(__name__, ["moe", "out"], ExtractOptions)
