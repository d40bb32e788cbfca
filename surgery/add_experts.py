"""`surgery add-experts`: MoE + dense models -> MoE with each dense model's FFN as a new routed expert.

Every MoE layer gets one new routed expert per `--expert NAME=DENSE`, appended after the existing ones:
its gate/up/down are byte copies of the dense model's FFN of that layer. The dense models must be of the
MoE's dense family (``families.dense_family``: Mixtral -> Mistral, Qwen3-MoE -> Qwen3 ...) with the MoE's
shapes: every non-FFN tensor of the dense model has the MoE's shape, its FFN the experts' shape.

Existing experts, router rows and shared experts are byte copies. Every other (non-FFN) weight is the
MoE's (``--non-ffn keep``) or the element-wise mean of the MoE's and each dense model's, in float32
(``--non-ffn average``: ``merge_mean.BlockedMean``, the recipe of ``surgery merge``). The new router rows
of each layer are fitted on the new experts' calibration texts (`--calibration NAME=FILE`) at the router
input of the written model: the output is written as a draft with its routers deferred, the draft runs
layer by layer on the texts, and at each MoE layer, with m the mean router input of one text and
u = m / ||m||, that text's row is c * u where c is 1.1 x the 90th percentile, over the text's tokens x
with u.x > 0, of (max existing logit at x) / (u.x): the new row's logit exceeds every existing logit on
about 90 % of those tokens (docs/add-experts.md). The layer then runs with its new rows, so later layers
see what the output feeds them; the rows are written into the draft before it becomes OUT.
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
from surgery.layouts import expert_parts, keep_source_layout
from surgery.operations.output import OutputOptions, check_choice, output_options, write
from surgery.plan import OutputTensor, Plan
from surgery.recipes import Copy

CALIBRATION_TOKENS = 2048
QUANTILE, MARGIN = 0.9, 1.1
NON_FFN = ("keep", "average")  # --non-ffn: the MoE's non-FFN weights, or their mean with the dense models'


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
        check_choice("--non-ffn", self.non_ffn, NON_FFN)
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
    stored = {source.info(recipe.name).dtype for recipe in expert_parts(
        source, family, source.config, arch.detect_expert_layout(family, source.tensors)).values()}
    for tensor in ffn.values():  # new experts are byte copies: they must already be in the experts' dtype
        if dense.info(tensor).dtype not in stored:
            raise SurgeryError(f"{dense.info(tensor).file}: tensor {tensor!r} is {dense.info(tensor).dtype} in {name}, "
                               f"but the MoE's experts are {'/'.join(sorted(stored))}; convert it first "
                               f"(surgery copy {dense.directory} OUT --dtype ...)")
    return ffn


# ------------------------------------------------------------------ router rows
def fit_row(inputs, existing) -> tuple:
    """(FloatTensor[hidden], share of the tokens it wins): the new router row for one text's router inputs
    `inputs` [tokens, hidden] against the existing rows `existing` [experts, hidden] (module docstring's rule)."""
    import torch

    inputs, existing = inputs.double(), existing.double()
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
    return (scale * unit).float(), float((scale * projection > best).double().mean())


def fit_rows(weights, family, calibration, existing: dict, settings, spill_dir=None) -> tuple:
    """({MoE layer: router [experts + new, hidden] in the existing rows' dtype}, {layer: [share of its text each
    new row wins]}): `weights` (the written draft) runs layer by layer on `calibration` (one domain per new
    expert); at each MoE layer (`existing`: {layer: its existing router rows}) each text's row is fitted at the
    router's input, the router is set to the existing rows and the new ones, and the layer runs with it."""
    import torch

    from surgery.execution.session import Collect, router_input_probe, runner_for
    from surgery.routing import router_path

    runner = runner_for(weights, calibration.batches, settings, spill_dir, reuse_attention=True)
    domains = sorted(set(calibration.domains or [0]))
    routers, wins = {}, {}

    def visit(layer, session, hidden):
        if layer not in existing:
            return None
        collect = Collect()
        session.run(hidden, [router_input_probe(family, collect)], stop_after=family.router_input)
        inputs, labels = collect.by_domain(calibration)
        fitted = [fit_row(inputs[labels == domain], existing[layer]) for domain in domains]
        rows = torch.stack([row for row, _ in fitted]).to(existing[layer].dtype)
        routers[layer] = torch.cat([existing[layer], rows])
        wins[layer] = [share for _, share in fitted]
        session.set_parameter(router_path(family) + ".weight", routers[layer])
        return None  # the layer then runs plainly, with its new rows

    runner.forward(visit, last=max(existing), final_output=False, description="fitting router rows")
    return routers, wins


def fill_routers(source: Checkpoint, family, plan: Plan, calibration, settings, spill_dir, details: dict,
                 notes: list[str]):
    """The writer's ``fill`` for the plan's deferred routers: fits the new rows on the draft (``fit_rows``) and
    records each row's wins in `details`, `notes` and the model card."""
    from pathlib import Path

    from surgery.btx_router import PendingRouter
    from surgery.execution.weights import ModelWeights
    from surgery.io.deferred import Filled

    pending = {t.name: t.recipe.layer for t in plan.tensors if isinstance(t.recipe, PendingRouter)}

    def fill(draft, patch) -> Filled:
        existing = {layer: source.read(name) for layer, name in router_names(source, family).items()}
        with Checkpoint.open(draft) as checkpoint:
            routers, wins = fit_rows(ModelWeights.from_checkpoint(checkpoint), family, calibration, existing,
                                     settings, spill_dir)
        for position, entry in enumerate(details["added"]):
            entry["wins"] = {layer: shares[position] for layer, shares in wins.items()}
            low, high = min(entry["wins"].values()), max(entry["wins"].values())
            notes.append(f"expert {entry['index']} ({entry['name']}): FFN of {Path(entry['dense']).name}; its router "
                         f"row wins {low:.0%}-{high:.0%} of {entry['calibration']}'s {entry['tokens']} tokens over "
                         f"the existing experts, per MoE layer")
        return Filled({name: routers[layer] for name, layer in pending.items()},
                      {"README.md": model_card(source, details)})

    return fill


def router_names(source: Checkpoint, family) -> dict:
    """{MoE layer: name of its router tensor in `source`}, in the source's stored layout."""
    from surgery.prune_scores import moe_layers

    layout = arch.detect_expert_layout(family, source.tensors)
    router = family.fused_router or family.router if layout == "fused" else family.router
    return {layer: router.name(layer) for layer in moe_layers(family, source.config)}


# ------------------------------------------------------------------ the plan
def build_plan(source: Checkpoint, family, denses: dict, ffns: dict, details: dict, notes: list[str]) -> Plan:
    """Every output tensor from headers only; the routers deferred (fitted on the written draft)."""
    from surgery.btx_router import PendingRouter
    from surgery.moe_plan import MOE_GROUPS

    config = source.config
    layout = arch.detect_expert_layout(family, source.tensors)
    count = arch.dimensions(family, config)["experts"]
    names = list(denses)
    new_config = dict(config)
    keys = [key for key in family.moe_keys["experts"] if key in config] or list(family.moe_keys["experts"][:1])
    new_config.update({key: count + len(names) for key in keys})
    pieces = expert_parts(source, family, config, layout)
    routers = router_names(source, family)
    non_ffn = non_ffn_recipe(source, denses, details["non_ffn"])
    tensors, averaged = [], []
    for expected in arch.expected_tensors(family, new_config, "per_expert").values():
        if expected.group == "experts" and expected.expert >= count:
            name = names[expected.expert - count]
            recipe = Copy(denses[name], ffns[name][(expected.role, expected.layer)])
            dtype = denses[name].info(recipe.name).dtype
        elif expected.group == "experts":
            recipe = pieces[(expected.role, expected.layer, expected.expert)]
            dtype = source.info(recipe.name).dtype
        elif expected.group == "router":
            dtype = source.info(routers[expected.layer]).dtype
            recipe = PendingRouter(f"rows 0-{count - 1} of {routers[expected.layer]}, then the rows of "
                                   f"{', '.join(names)} fitted on the written draft", expected.layer)
        elif expected.group in MOE_GROUPS:  # a shared expert or its gate (a dense FFN of a non-MoE layer)
            recipe, dtype = Copy(source, expected.name), source.info(expected.name).dtype
        else:  # attention, norms, embeddings, head
            recipe, dtype = non_ffn(expected.name), source.info(expected.name).dtype
            averaged += [expected.name] if details["non_ffn"] == "average" else []
        tensors.append(OutputTensor(expected.name, expected.shape, dtype, recipe))
    known = arch.expected_tensors(family, config, layout)
    extra = [name for name in source.tensors if name not in known]
    if extra:
        raise SurgeryError(f"{source.directory}: tensor {extra[0]!r} is not part of a {family.architecture} "
                           f"checkpoint with this config.json; add-experts would drop it")
    if averaged:
        details["non_ffn_mean"] = {"method": "element-wise mean (float32), stored in the MoE's dtype",
                                   "models": [str(source.path)] + [str(d.path) for d in denses.values()],
                                   "weight": 1 / (1 + len(denses)), "tensors": len(averaged)}
        notes.append(f"--non-ffn average: {len(averaged)} non-FFN tensors (attention, norms, embeddings, head) are the "
                     f"mean of {source.directory.name} and {', '.join(names)}; existing experts, router rows and "
                     f"shared experts are byte copies, and the new rows are fitted on the averaged model")
    metadata = {"surgery_sources": json.dumps([str(source.path)] + [str(d.path) for d in denses.values()]),
                "surgery_add_experts": json.dumps(details)}
    return Plan("add-experts", tensors, new_config, [source, *denses.values()], side_files=source.side_files(),
                extra_files={"README.md": model_card(source, details)}, metadata=metadata, notes=notes,
                details={"add_experts": details})


def non_ffn_recipe(source: Checkpoint, denses: dict, choice: str):
    """name -> the recipe of a non-FFN tensor: a copy of the MoE's (keep), or the equal-weight mean of the MoE's
    and every dense model's (average; ``surgery merge``'s recipe)."""
    if choice == "keep":
        return lambda name: Copy(source, name)
    from surgery.merge_mean import BlockedMean

    def recipe(name):
        for dense_name, dense in denses.items():
            if name not in dense.tensors:
                raise SurgeryError(f"{dense.directory}: tensor {name!r} is missing in {dense_name}; --non-ffn average "
                                   f"needs every non-FFN tensor of the MoE")
        return BlockedMean([source, *denses.values()], name, [1.0] * (1 + len(denses)))

    return recipe


def model_card(source: Checkpoint, details: dict) -> str:
    if details["non_ffn"] == "average":
        mean = details["non_ffn_mean"]
        non_ffn = (f"Every other weight ({mean['tensors']} tensors: attention, norms, embeddings, head) is the "
                   f"element-wise mean of `{source.directory.name}` and the dense models, computed in float32 "
                   f"(`--non-ffn average`); the new router rows are fitted on this averaged model.")
    else:
        non_ffn = f"Every other weight is `{source.directory.name}`'s (`--non-ffn keep`)."
    lines = [f"# {source.directory.name}, with added experts", "",
             f"Made with `surgery add-experts` from `{source.directory.name}`: {details['experts']} -> "
             f"{details['experts'] + len(details['added'])} routed experts per MoE layer. Existing experts and router "
             f"rows are byte copies; each new expert is a byte copy of its dense model's FFN, its router row fitted "
             f"on its calibration text. {non_ffn}", "",
             "| expert | index | dense model | calibration | tokens | share of its text won per layer |",
             "|---|---|---|---|---|---|"]
    for entry in details["added"]:
        wins = ", ".join(f"{value:.0%}" for value in entry["wins"].values()) if "wins" in entry else "(when written)"
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
    """Add experts to MOE into OUT (the command and ``surgery.add_experts`` both land here)."""
    from pathlib import Path

    from surgery.execution.calibration import CalibrationSet
    from surgery.layouts import convert

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
        fill = fill_routers(source, family, plan, CalibrationSet.combine(parts), options.run,
                            Path(out).resolve().parent, details, notes)
        return write(plan, out, output, fill=fill)


# `surgery.add_experts(...)`: this module is also the API function (surgery.api.add_experts)
from surgery.api import callable_module  # noqa: E402

callable_module(__name__, ["moe", "out"], AddExpertsOptions, extra={"layout": "keep"})
