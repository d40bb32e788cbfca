"""`surgery prune`: MoE -> MoE with fewer routed experts, the best-scored ones of every MoE layer.

Per MoE layer every routed expert is scored (``surgery.prune_scores``: reap, frequency, activation or
random) and the `--keep N` best are kept (ties: the lower index). Kept experts are byte copies of the
source's (in either stored layout), the router keeps the kept experts' rows in their original order,
every other tensor (attention, norms, a shared expert, dense layers) is copied. The config gets the new
expert count; the top-k is the source's unless `--top-k` says otherwise. The scores and the kept and
dropped experts of each layer go into the safetensors metadata, the model card and the plan's JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import click

from surgery import families as arch
from surgery.checkpoint import Checkpoint
from surgery.moe_plan import moe_family
from surgery.errors import SurgeryError
from surgery.execution.session import RunsModel, run_options
from surgery.operations.output import OutputOptions, check_choice, output_options, write
from surgery.plan import OutputTensor, Plan
from surgery.prune_scores import CALIBRATED, CRITERIA
from surgery.layouts import expert_parts, keep_source_layout
from surgery.recipes import Copy, Rows

CALIBRATION_TOKENS = 2048


@dataclass(frozen=True)
class PruneOptions(RunsModel):
    keep: int | None = None
    ratio: float | None = None
    criterion: str = "reap"
    calibration: str | None = None
    calibration_tokens: int = CALIBRATION_TOKENS
    top_k: int | None = None
    seed: int = 0
    scores: str | None = None
    save_scores: str | None = None
    device: str = "auto"
    memory_budget: str | None = None
    compute_dtype: str = "auto"

    def check(self) -> None:
        check_choice("--criterion", self.criterion, CRITERIA)
        if (self.keep is None) == (self.ratio is None):
            raise SurgeryError("give one of --keep N and --ratio R (the share of experts to drop)")
        if self.keep is not None and self.keep < 1:
            raise SurgeryError(f"--keep {self.keep}: expected at least 1")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise SurgeryError(f"--ratio {self.ratio}: expected 0 <= R < 1 (the share of experts to drop)")
        if self.top_k is not None and self.top_k < 1:
            raise SurgeryError(f"--top-k {self.top_k}: expected at least 1")
        if self.scores is not None and self.save_scores is not None:
            raise SurgeryError("--scores reuses saved scores; --save-scores writes new ones: give one of them")
        if self.scores is not None and self.calibration is not None:
            raise SurgeryError(f"--scores {self.scores} holds the scores of an earlier calibration; do not also give "
                               f"--calibration")
        self.run.check()


# ------------------------------------------------------------------ choosing
def kept_count(options: PruneOptions, experts: int) -> int:
    if options.keep is not None:
        if options.keep >= experts:
            raise SurgeryError(f"--keep {options.keep}: must be below the source's {experts} experts per MoE layer "
                               "(--ratio 0 keeps them all)")
        return options.keep
    return experts - math.floor(options.ratio * experts + 1e-9)


def output_top_k(options: PruneOptions, top_k: int, keep: int, notes: list[str]) -> int:
    if options.top_k is not None:
        if options.top_k > keep:
            raise SurgeryError(f"--top-k {options.top_k} exceeds the {keep} experts kept per layer")
        return options.top_k
    if top_k <= keep:
        return top_k
    if options.keep is not None:
        raise SurgeryError(f"--keep {keep} is below the source's top-k ({top_k}): give --top-k K (at most {keep}) "
                           f"to route each token to fewer experts")
    notes.append(f"top-k clamped from {top_k} to {keep}, the experts kept per layer (--ratio {options.ratio})")
    return keep


def choose(scores: dict[int, list[float]], keep: int) -> dict[int, list[int]]:
    """{layer: the `keep` best-scored experts, in index order}; ties keep the lower index."""
    return {layer: sorted(sorted(range(len(values)), key=lambda e: -values[e])[:keep])
            for layer, values in scores.items()}


# ------------------------------------------------------------------ the plan
def build_plan(source: Checkpoint, family, kept: dict[int, list[int]], top_k: int, details: dict,
               notes: list[str]) -> Plan:
    config = source.config
    layout = arch.detect_expert_layout(family, source.tensors)
    new_config = dict(config)
    for dimension, value in (("experts", len(next(iter(kept.values())))), ("top_k", top_k)):
        keys = [key for key in family.moe_keys[dimension] if key in config] or list(family.moe_keys[dimension][:1])
        new_config.update({key: value for key in keys})
    pieces = expert_parts(source, family, config, layout)
    router = family.fused_router or family.router if layout == "fused" else family.router
    tensors = []
    for expected in arch.expected_tensors(family, new_config, "per_expert").values():
        if expected.group == "experts":
            recipe = pieces[(expected.role, expected.layer, kept[expected.layer][expected.expert])]
        elif expected.group == "router":
            recipe = Rows(source, router.name(expected.layer), kept[expected.layer])
        else:
            recipe = Copy(source, expected.name)
        tensors.append(OutputTensor(expected.name, expected.shape, source.info(recipe.name).dtype, recipe))
    known = arch.expected_tensors(family, config, layout)
    extra = [name for name in source.tensors if name not in known]
    if extra:
        raise SurgeryError(f"{source.directory}: tensor {extra[0]!r} is not part of a {family.architecture} "
                           f"checkpoint with this config.json; prune would drop it")
    metadata = {"surgery_sources": json.dumps([str(source.path)]), "surgery_prune": json.dumps(details)}
    return Plan("prune", tensors, new_config, [source], side_files=source.side_files(),
                extra_files={"README.md": model_card(source, details)}, metadata=metadata, notes=notes,
                details={"prune": details})


def model_card(source: Checkpoint, details: dict) -> str:
    lines = [f"# {source.directory.name}, pruned", "",
             f"Made with `surgery prune` from `{source.directory.name}`: {details['experts']} -> {details['kept']} "
             f"routed experts per MoE layer, top-k {details['top_k']}, criterion `{details['criterion']}`"
             + (f" on {details['calibration']} ({details['tokens']} tokens)" if details.get("calibration") else "")
             + ". Kept experts are byte copies of the source's; each router keeps the kept experts' rows in their "
               "original order.", "",
             "| layer | kept (source index) | dropped | scores |", "|---|---|---|---|"]
    for layer, entry in details["layers"].items():
        scores = ", ".join(f"{value:.4g}" for value in entry["scores"])
        lines.append(f"| {layer} | {', '.join(map(str, entry['kept']))} | {', '.join(map(str, entry['dropped'])) or '-'} "
                     f"| {scores} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ command and API
@click.command("prune")
@click.argument("moe", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--keep", type=int, default=None, help="Routed experts kept per MoE layer.")
@click.option("--ratio", type=float, default=None, help="Share of routed experts dropped per MoE layer (0 <= R < 1).")
@click.option("--criterion", default="reap", show_default=True, type=click.Choice(CRITERIA),
              help="How experts are scored (docs/prune.md): reap = mean gate weight x output norm over routed tokens, "
                   "frequency = share of tokens routed, activation = mean output norm, random = seeded baseline.")
@click.option("--calibration", default=None, metavar="FILE",
              help="Calibration text or token ids (.npy/.pt/.jsonl) [default: the shipped sample text].")
@click.option("--calibration-tokens", default=CALIBRATION_TOKENS, show_default=True, type=click.IntRange(2),
              help="Calibration tokens the scoring pass runs.")
@click.option("--top-k", type=int, default=None, help="Experts per token in the output [default: the source's].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of --criterion random.")
@click.option("--scores", default=None, metavar="FILE", help="Reuse the scores a --save-scores run wrote.")
@click.option("--save-scores", default=None, metavar="FILE", help="Write every criterion's scores to FILE (JSON).")
@run_options
@output_options(verify=False, layout="keep")
def command(moe, out, output, **options):
    """Drop the lowest-scored routed experts of every MoE layer of MOE; write OUT."""
    run(moe, out, PruneOptions(**options), output)


def run(moe, out, options: PruneOptions, output: OutputOptions = OutputOptions(layout="keep")):
    """Prune MOE into OUT (the command and ``surgery.prune`` both land here); returns a ``Result``."""

    from surgery import prune_scores

    output.check()
    options.check()
    with Checkpoint.open(moe, require_config=True) as source:
        family = moe_family(source, "prune")
        dims = arch.dimensions(family, source.config, source.directory / "config.json")
        keep = kept_count(options, dims["experts"])
        notes: list[str] = []
        top_k = output_top_k(options, dims["top_k"], keep, notes)
        calibrated = None
        if options.scores is not None:
            calibrated = prune_scores.load(options.scores, family, source.config)
        elif options.criterion in CALIBRATED or options.save_scores is not None:
            calibrated = prune_scores.calibrated_scores(source, family, options.calibration,
                                                        options.calibration_tokens, options.run)
            if options.save_scores is not None:
                prune_scores.save(calibrated, options.save_scores)
                notes.append(f"scores of every criterion saved to {options.save_scores}")
        if options.criterion == "random":
            scores = prune_scores.random_scores(family, source.config, options.seed)
        else:
            scores, unrouted = prune_scores.criterion_scores(calibrated, options.criterion)
            if unrouted:
                counts = ", ".join(f"layer {layer}: {len(experts)}" for layer, experts in sorted(unrouted.items()))
                notes.append(f"no calibration token reached some experts ({counts}); they score 0 under "
                             f"{options.criterion} (they add nothing on this text) and are dropped first")
        if calibrated is not None and options.criterion != "random":
            notes.append(f"{options.criterion} scores from {calibrated['calibration']} ({calibrated['tokens']} tokens)"
                         + (f", saved by an earlier run in {options.scores}" if options.scores else ""))
        kept = choose(scores, keep)
        details = {"criterion": options.criterion, "experts": dims["experts"], "kept": keep, "top_k": top_k,
                   "seed": options.seed if options.criterion == "random" else None,
                   "calibration": calibrated["calibration"] if calibrated and options.criterion != "random" else None,
                   "tokens": calibrated["tokens"] if calibrated and options.criterion != "random" else None,
                   "layers": {layer: {"kept": kept[layer],
                                      "dropped": [e for e in range(dims["experts"]) if e not in kept[layer]],
                                      "scores": scores[layer]} for layer in kept}}
        if keep == dims["experts"]:
            notes.append(f"every one of the {keep} experts is kept: the output computes what the source computes"
                         + ("" if top_k == dims["top_k"] else f" except for the top-k ({dims['top_k']} -> {top_k})"))
        output = keep_source_layout(output, family, source.tensors)
        return write(build_plan(source, family, kept, top_k, details, notes), out, output)


# `surgery.prune(...)`: this module is also the API function (surgery.api.prune)
from surgery.api import callable_module  # noqa: E402

callable_module(__name__, ["moe", "out"], PruneOptions, extra={"layout": "keep"})
