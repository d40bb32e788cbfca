"""`surgery prune`: MoE -> MoE with fewer routed experts, the best-scored ones of every MoE layer.

Per MoE layer every routed expert is scored (``surgery.experts.scores``: reap, frequency, activation or random;
the calibrated ones from one layer-by-layer pass, ``surgery.experts.scoring``) and the `--keep N` best are kept
(ties: the lower index), as byte copies (``surgery.experts.prune_plan``).
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from surgery import families as arch
from surgery.checks import sizing
from surgery.errors import SurgeryError, check_choice
from surgery.execution.settings import RunOptions
from surgery.experts import scores
from surgery.experts.prune_plan import build_plan, choose, group_rule, kept_count, output_top_k
from surgery.experts.scores import CALIBRATED, CRITERIA
from surgery.io.checkpoint import Checkpoint
from surgery.operations.options import calibration_options, run_options
from surgery.operations.output import OutputOptions, output_options, write
from surgery.plan.layouts import keep_source_layout
from surgery.plan.sources import moe_family


@dataclass(frozen=True)
class PruneOptions(RunOptions):
    keep: int | None = None
    ratio: float | None = None
    criterion: str = "reap"
    calibration: str | None = None
    calibration_tokens: int = 2048
    top_k: int | None = None
    seed: int = 0
    scores: str | None = None
    save_scores: str | None = None

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


@click.command("prune")
@click.argument("moe", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--keep", type=int, default=None, help="Routed experts kept per MoE layer.")
@click.option("--ratio", type=float, default=None, help="Share of routed experts dropped per MoE layer (0 <= R < 1).")
@click.option("--criterion", default="reap", show_default=True, type=click.Choice(CRITERIA),
              help="How experts are scored (docs/prune.md): reap = mean gate weight x output norm over routed tokens, "
                   "frequency = share of tokens routed, activation = mean output norm, random = seeded baseline.")
@calibration_options(PruneOptions, metavar="FILE", tokens="Calibration tokens the scoring pass runs.",
                     calibration="Calibration text or token ids (.npy/.pt/.jsonl) [default: the shipped sample text].")
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
    """MoE -> MoE: keep the `keep` best-scored routed experts of every MoE layer (or drop the share `ratio`), scored
    by `criterion` (reap, frequency, activation, random; docs/prune.md). Returns a ``Result``
    (``result.plan.details["prune"]``: the scores and the kept and dropped experts per layer)."""
    output.check()
    options.check()
    with sizing.config_only(output.dry_run, needs=f"writing {out}"), \
            Checkpoint.open(moe, require_config=True) as source:
        family = moe_family(source, "prune")
        if source.config_only and options.scores is None and (options.criterion in CALIBRATED or options.save_scores):
            raise SurgeryError(f"{source.directory}: holds only config.json, no weights: --criterion "
                               f"{options.criterion}{' --save-scores' if options.save_scores else ''} runs the model on "
                               f"calibration text; a config-only --dry-run takes --criterion random or --scores FILE")
        dims = arch.dimensions(family, source.config, source.directory / "config.json")
        keep = kept_count(options, dims["experts"])
        notes: list[str] = []
        top_k = output_top_k(options, dims["top_k"], keep, notes)
        if keep < dims["experts"]:
            keep = group_rule(family, source.config, dims["experts"], keep, top_k, options, notes)
        calibrated = None
        if options.scores is not None:
            calibrated = scores.load(options.scores, family, source.config)
        elif options.criterion in CALIBRATED or options.save_scores is not None:
            from surgery.experts.scoring import calibrated_scores  # lazy: runs the model (not for --help)

            calibrated = calibrated_scores(source, family, options.calibration, options.calibration_tokens,
                                           options.run)
            if options.save_scores is not None:
                scores.save(calibrated, options.save_scores)
                notes.append(f"scores of every criterion saved to {options.save_scores}")
        if options.criterion == "random":
            ranked = scores.random_scores(family, source.config, options.seed)
        else:
            ranked, unrouted = scores.criterion_scores(calibrated, options.criterion)
            if unrouted:
                counts = ", ".join(f"layer {layer}: {len(experts)}" for layer, experts in sorted(unrouted.items()))
                notes.append(f"no calibration token reached some experts ({counts}); they score 0 under "
                             f"{options.criterion} (they add nothing on this text) and are dropped first")
        if calibrated is not None and options.criterion != "random":
            notes.append(f"{options.criterion} scores from {calibrated['calibration']} ({calibrated['tokens']} tokens)"
                         + (f", saved by an earlier run in {options.scores}" if options.scores else ""))
        kept = choose(ranked, keep, arch.route_groups(family, source.config)[0])
        details = {"criterion": options.criterion, "experts": dims["experts"], "kept": keep, "top_k": top_k,
                   "seed": options.seed if options.criterion == "random" else None,
                   "calibration": calibrated["calibration"] if calibrated and options.criterion != "random" else None,
                   "tokens": calibrated["tokens"] if calibrated and options.criterion != "random" else None,
                   "layers": {layer: {"kept": kept[layer],
                                      "dropped": [e for e in range(dims["experts"]) if e not in kept[layer]],
                                      "scores": ranked[layer]} for layer in kept}}
        if keep == dims["experts"]:
            notes.append(f"every one of the {keep} experts is kept: the output computes what the source computes"
                         + ("" if top_k == dims["top_k"] else f" except for the top-k ({dims['top_k']} -> {top_k})"))
        output = keep_source_layout(output, family, source.tensors)
        return write(build_plan(source, family, kept, top_k, details, notes), out, output)
