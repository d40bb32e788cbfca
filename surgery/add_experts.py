"""`surgery add-experts`: MoE + dense models -> MoE with each dense model's FFN as a new routed expert.

Every MoE layer gets one new routed expert per `--expert NAME=DENSE`, appended after the existing ones:
its gate/up/down are byte copies of the dense model's FFN of that layer. The dense models must be of the
MoE's dense family (``families.dense_family``: Mixtral -> Mistral, Qwen3-MoE -> Qwen3 ...) with the MoE's
shapes: every non-FFN tensor of the dense model has the MoE's shape, its FFN the experts' shape.

Existing experts and router rows are byte copies; every non-FFN weight is the MoE's. The new router row
of each layer is fitted on the new expert's calibration text (`--calibration NAME=FILE`) at the router's
real input: the MoE runs layer by layer on that text (it is unchanged up to each router, so its router
inputs are the output's), and with m the mean router input and u = m / ||m||, the row is c * u where c is
1.1 x the 90th percentile, over the text's tokens x with u.x > 0, of (max existing logit at x) / (u.x):
the new row's logit exceeds every existing logit on about 90 % of those tokens (docs/add-experts.md).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import click

from surgery import families as arch
from surgery.checkpoint import Checkpoint
from surgery.moe_plan import moe_family
from surgery.errors import SurgeryError
from surgery.execution.session import RunsModel, run_options
from surgery.layouts import expert_parts
from surgery.operations.output import OutputOptions, output_options, write
from surgery.plan import OutputTensor, Plan
from surgery.recipes import Concat, Constant, Copy

CALIBRATION_TOKENS = 2048
QUANTILE, MARGIN = 0.9, 1.1


def _pairs(values, option: str) -> dict[str, str]:
    """{NAME: VALUE} from NAME=VALUE strings (or a dict, from the API)."""
    if isinstance(values, dict):
        return {str(k): str(v) for k, v in values.items()}
    from surgery.merge_config import parse_pair

    out = {}
    for value in values or ():
        name, path = parse_pair(value, option, "PATH")
        if name in out:
            raise SurgeryError(f"{option} {value}: {name} is given twice")
        out[name] = path
    return out


@dataclass(frozen=True)
class AddExpertsOptions(RunsModel):
    expert: tuple = ()
    calibration: tuple = ()
    calibration_tokens: int = CALIBRATION_TOKENS
    non_ffn: str = "keep"
    device: str = "auto"
    memory_budget: str | None = None
    compute_dtype: str = "auto"

    def experts(self) -> dict[str, str]:
        return _pairs(self.expert, "--expert")

    def calibrations(self) -> dict[str, str]:
        return _pairs(self.calibration, "--calibration")

    def check(self) -> None:
        experts, calibrations = self.experts(), self.calibrations()
        if not experts:
            raise SurgeryError("give at least one --expert NAME=DENSE")
        if self.non_ffn != "keep":
            raise SurgeryError(f"--non-ffn {self.non_ffn}: only keep (the MoE's non-FFN weights) is supported")
        for name in calibrations:
            if name not in experts:
                raise SurgeryError(f"--calibration {name}=...: no --expert {name}=DENSE")
        for name in experts:
            if name not in calibrations:
                raise SurgeryError(f"--expert {name}: give --calibration {name}=FILE (text or token ids); the new "
                                   f"router row is fitted on it, and an unfitted row would never be chosen")
        self.run.check()


# ------------------------------------------------------------------ compatibility
def check_dense(source: Checkpoint, family, dense: Checkpoint, name: str) -> dict:
    """Refuse a dense model that is not of the MoE's dense family or shapes; returns its FFN names
    {(role, layer): tensor name}."""
    from surgery.families.convert import dense_family

    where = dense.directory / "config.json"
    wanted = dense_family(family, source.directory / "config.json")
    found = arch.detect_family(dense.config, where)
    if found.name != wanted.name:
        raise SurgeryError(f"{where}: architecture is {found.architecture} in {name}, but a {family.architecture} "
                           f"takes experts from {wanted.architecture} models")
    moe_shapes = {e.name: e.shape for e in arch.expected_tensors(family, source.config, "per_expert").values()}
    expert_shape = {e.role: e.shape for e in arch.expected_tensors(family, source.config, "per_expert").values()
                    if e.group == "experts"}
    ffn = {}
    for expected in arch.expected_tensors(found, dense.config, "per_expert", where).values():
        if expected.name not in dense.tensors:
            raise SurgeryError(f"{dense.directory}: tensor {expected.name!r} is missing in {name}")
        shape = tuple(dense.info(expected.name).shape)
        if expected.group == "ffn":
            ffn[(expected.role, expected.layer)] = expected.name
            target = tuple(expert_shape[expected.role])
        elif expected.name in moe_shapes:
            target = tuple(moe_shapes[expected.name])
        else:
            raise SurgeryError(f"{dense.directory}: tensor {expected.name!r} is in {name} but not in the MoE")
        if shape != target:
            raise SurgeryError(f"{dense.info(expected.name).file}: tensor {expected.name!r} has shape {list(shape)} "
                               f"in {name}, but {list(target)} in the MoE")
    return ffn


# ------------------------------------------------------------------ router rows
def fit_rows(source: Checkpoint, family, calibration_path: str, tokens: int, settings, router_names: dict) -> tuple:
    """({MoE layer: FloatTensor[hidden]}, {layer: share of the text's tokens the row wins}, tokens): one new
    router row per MoE layer fitted on the MoE's router inputs on the text (module docstring's rule)."""
    import torch

    from surgery.execution.calibration import CalibrationSet
    from surgery.execution.session import Collect, router_input_probe, runner_for
    from surgery.execution.weights import ModelWeights

    calibration = CalibrationSet.load(calibration_path, source.directory, source.config, tokens)
    runner = runner_for(ModelWeights.from_checkpoint(source), calibration.batches, settings)
    layers = sorted(router_names)
    rows, wins = {}, {}

    def visit(layer, session, hidden):
        if layer not in router_names:
            return None
        collect = Collect()
        after = session.run(hidden, [router_input_probe(family, collect)], outputs=session.needs_output)
        inputs = collect.tensor().double()
        existing = source.read(router_names[layer]).double()
        best = (inputs @ existing.T).max(dim=-1).values
        mean = inputs.mean(dim=0)
        unit = mean / mean.norm().clamp_min(1e-12)
        projection = inputs @ unit
        positive = projection > 0
        scale = float(existing.norm(dim=-1).mean())
        if positive.any():
            quantile = float(torch.quantile(best[positive] / projection[positive], QUANTILE))
            if quantile > 0:
                scale = MARGIN * quantile
        rows[layer] = (scale * unit).float()
        wins[layer] = float((scale * projection > best).double().mean())
        return after

    runner.forward(visit, last=max(layers), final_output=False, description="fitting router rows")
    return rows, wins, calibration


# ------------------------------------------------------------------ the plan
def build_plan(source: Checkpoint, family, denses: dict, ffns: dict, rows: dict, details: dict,
               notes: list[str]) -> Plan:
    config = source.config
    layout = arch.detect_expert_layout(family, source.tensors)
    count = arch.dimensions(family, config)["experts"]
    names = list(denses)
    new_config = dict(config)
    keys = [key for key in family.moe_keys["experts"] if key in config] or list(family.moe_keys["experts"][:1])
    new_config.update({key: count + len(names) for key in keys})
    pieces = expert_parts(source, family, config, layout)
    router = family.fused_router or family.router if layout == "fused" else family.router
    tensors = []
    for expected in arch.expected_tensors(family, new_config, "per_expert").values():
        if expected.group == "experts" and expected.expert >= count:
            name = names[expected.expert - count]
            recipe = Copy(denses[name], ffns[name][(expected.role, expected.layer)])
            dtype = denses[name].info(recipe.name).dtype
        elif expected.group == "experts":
            recipe = pieces[(expected.role, expected.layer, expected.expert)]
            dtype = source.info(recipe.name).dtype
        elif expected.group == "router":
            stored = router.name(expected.layer)
            dtype = source.info(stored).dtype
            torch_dtype = source.read(stored).dtype
            new = [Constant(rows[name][expected.layer].to(torch_dtype).reshape(1, -1),
                            f"router row of {name} (fitted)") for name in names]
            recipe = Concat([Copy(source, stored), *new], dim=0)
        else:
            recipe = Copy(source, expected.name)
            dtype = source.info(recipe.name).dtype
        tensors.append(OutputTensor(expected.name, expected.shape, dtype, recipe))
    known = arch.expected_tensors(family, config, layout)
    extra = [name for name in source.tensors if name not in known]
    if extra:
        raise SurgeryError(f"{source.directory}: tensor {extra[0]!r} is not part of a {family.architecture} "
                           f"checkpoint with this config.json; add-experts would drop it")
    metadata = {"surgery_sources": json.dumps([str(source.path)] + [str(d.path) for d in denses.values()]),
                "surgery_add_experts": json.dumps(details)}
    return Plan("add-experts", tensors, new_config, [source, *denses.values()], side_files=source.side_files(),
                extra_files={"README.md": model_card(source, details)}, metadata=metadata, notes=notes,
                details={"add_experts": details})


def model_card(source: Checkpoint, details: dict) -> str:
    lines = [f"# {source.directory.name}, with added experts", "",
             f"Made with `surgery add-experts` from `{source.directory.name}`: {details['experts']} -> "
             f"{details['experts'] + len(details['added'])} routed experts per MoE layer. Existing experts and router "
             f"rows are byte copies; each new expert is a byte copy of its dense model's FFN, its router row fitted "
             f"on its calibration text.", "",
             "| expert | index | dense model | calibration | tokens | share of its text won per layer |",
             "|---|---|---|---|---|---|"]
    for entry in details["added"]:
        wins = ", ".join(f"{value:.0%}" for value in entry["wins"].values())
        lines.append(f"| {entry['name']} | {entry['index']} | {entry['dense']} | {entry['calibration']} | "
                     f"{entry['tokens']} | {wins} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ command and API
@click.command("add-experts")
@click.argument("moe", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--expert", multiple=True, metavar="NAME=DENSE",
              help="A dense model (the MoE's dense family and shapes) whose FFN becomes a new expert; repeatable.")
@click.option("--calibration", multiple=True, metavar="NAME=FILE",
              help="Text or token ids (.npy/.pt/.jsonl) of expert NAME's domain; its router row is fitted on it.")
@click.option("--calibration-tokens", default=CALIBRATION_TOKENS, show_default=True, type=click.IntRange(2),
              help="Calibration tokens per new expert.")
@click.option("--non-ffn", default="keep", show_default=True, type=click.Choice(["keep"]),
              help="Non-FFN weights: the MoE's.")
@run_options
@output_options(verify=False, layout="keep")
def command(moe, out, output, **options):
    """Add each dense model's FFN as a new routed expert in every MoE layer of MOE; write OUT."""
    run(moe, out, AddExpertsOptions(**options), output)


def run(moe, out, options: AddExpertsOptions, output: OutputOptions = OutputOptions(layout="keep")):
    """Add experts to MOE into OUT (the command and ``surgery.add_experts`` both land here)."""
    from dataclasses import replace

    from surgery.prune_scores import moe_layers

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
        layout = arch.detect_expert_layout(family, source.tensors)
        router = family.fused_router or family.router if layout == "fused" else family.router
        router_names = {layer: router.name(layer) for layer in moe_layers(family, source.config)}
        count = arch.dimensions(family, source.config)["experts"]
        rows, added, notes = {}, [], []
        for index, name in enumerate(experts):
            rows[name], wins, calibration = fit_rows(source, family, calibrations[name], options.calibration_tokens,
                                                     options.run, router_names)
            added.append({"name": name, "index": count + index, "dense": str(denses[name].path),
                          "calibration": calibration.source, "tokens": calibration.tokens, "wins": wins})
            notes.append(f"expert {count + index} ({name}): FFN of {denses[name].directory.name}; its router row wins "
                         f"{min(wins.values()):.0%}-{max(wins.values()):.0%} of {calibration.source}'s "
                         f"{calibration.tokens} tokens over the existing experts, per MoE layer")
        if len(experts) > 1:
            notes.append("each new row is fitted against the existing rows only, not against the other new rows")
        details = {"experts": count, "added": added, "non_ffn": options.non_ffn}
        if output.layout == "keep":
            output = replace(output, layout=layout.replace("_", "-"))
        return write(build_plan(source, family, denses, ffns, rows, details, notes), out, output)


# `surgery.add_experts(...)`: this module is also the API function (surgery.api.add_experts)
from surgery.api import callable_module  # noqa: E402

callable_module(__name__, ["moe", "out"], AddExpertsOptions, extra={"layout": "keep"})
