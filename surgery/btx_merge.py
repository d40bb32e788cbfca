"""`surgery merge`: Branch-Train-MiX. Domain-trained copies of one seed become one MoE.

FFN of layer l of model i -> expert i of MoE layer l (bit-exact copies); ``--include-seed`` adds the seed's FFN as
one more expert (the BTX paper's generalist). Every other tensor (embeddings, attention, norms, lm_head) is, by
``--non-ffn``, fitted to the models' inputs (RegMean, RegMean++), their weighted mean, or one model's copy
(mergekit-moe's behaviour). The merge's machinery is ``surgery.btx``: what is asked (``spec``, or a YAML file,
ours or mergekit-moe's), its members and their compatibility, its plan, and running it (``run``: calibrated
routers, RegMean and the head fit fitted on the written draft).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
from click.core import ParameterSource

from surgery.btx.config_file import load_config
from surgery.btx.members import open_merge, resolve_non_ffn, resolve_router_init
from surgery.btx.run import run_merge
from surgery.btx.spec import (FITS_DEFAULT, ROUTER_FITS, ROUTER_INITS, MergeSpec, check_spec, parse_weights,
                              read_calibration, spec_from_options)
from surgery.errors import SurgeryError
from surgery.execution.settings import RunOptions
from surgery.operations.options import FORMATS, calibration_options, dtype_option, parse_pairs, run_options
from surgery.operations.output import OutputOptions, output_options


@dataclass(frozen=True)
class MergeOptions(RunOptions):
    experts: tuple | dict = ()  # NAME=PATH in expert order (the API: {name: directory})
    config: str | None = None  # a YAML file (ours or a mergekit-moe config); options given explicitly override it
    seed: str | None = None  # the seed model the experts were branched from (averaged in)
    include_seed: bool = False
    weights: tuple | dict = ()  # NAME=W,... averaging weights of the non-FFN tensors (the API: {name: weight})
    non_ffn: str = "auto"
    head_fit: bool | None = None  # None: auto
    top_k: int = 2
    format: str = "auto"
    router_init: str = "auto"
    router_fit: str = FITS_DEFAULT
    calibration: tuple | dict = ()  # NAME=FILE: an expert's text or token ids (the API: {name: file})
    calibration_tokens: int = 16384  # per domain
    router_seed: int = 0
    dtype: str = "keep"

    def spec(self, given=frozenset()) -> MergeSpec:
        """What the merge is asked to do: these options, or the --config file with the options in `given` (those
        the caller gave explicitly) overriding it."""
        if self.config is None:
            return spec_from_options(self.experts, self.seed, self.include_seed, self.weights, self.non_ffn,
                                     self.top_k, self.format, self.router_init, self.calibration, self.dtype,
                                     self.router_seed, self.calibration_tokens, self.router_fit, self.head_fit)
        if self.experts:
            raise SurgeryError(f"--config {self.config} lists the experts; do not also give --expert")
        spec = load_config(self.config)
        for name in ("seed", "include_seed", "non_ffn", "top_k", "format", "router_init", "router_fit", "dtype",
                     "router_seed", "calibration_tokens", "head_fit"):
            if name in given:
                setattr(spec, name, getattr(self, name))
        if "format" in given:
            spec.format_choices = ()  # --format wins over a mergekit architecture
        if "weights" in given:
            spec.weights.update(parse_weights(self.weights))
        if "calibration" in given:
            for name, path in parse_pairs(self.calibration, "--calibration", "FILE"):
                spec.calibration[name] = read_calibration(path)
        check_spec(spec, where=str(self.config))
        return spec


@click.command("merge")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--expert", "experts", multiple=True, metavar="NAME=PATH",
              help="A domain-trained model; its FFNs become expert i (in the order given). Repeat per expert.")
@click.option("--config", type=click.Path(path_type=str),
              help="A YAML file with the merge (ours or a mergekit-moe config); options given here override it.")
@click.option("--seed", metavar="PATH", help="The seed model the experts were branched from (averaged in).")
@click.option("--include-seed", is_flag=True, help="Add the seed's FFN as one more (generalist) expert.")
@click.option("--weights", multiple=True, metavar="NAME=W,...",
              help="Averaging weights of the non-FFN tensors (default 1 each; the seed is named 'seed').")
@click.option("--non-ffn", default="auto", show_default=True, metavar="auto|average|regmean|regmean++|seed|NAME",
              help="auto: regmean++ when the routers are calibrated, else average. average: the mean of the non-FFN "
                   "tensors over all models; regmean: fit the attention, embedding and head weights to each "
                   "model's own inputs on its calibration text (RegMean), average the rest; regmean++: the same with "
                   "each layer's inputs taken from the merged model as it runs (RegMean++); or copy one model's "
                   "(mergekit's behaviour).")
@click.option("--head-fit/--no-head-fit", default=None,
              help="After RegMean++, refit the head so the merged model's last hidden states give each expert's "
                   "next-token distributions on its calibration text. Default: auto, which runs it when its 800 "
                   "steps of 3 x 2048 tokens per domain x hidden x vocab multiply-adds are at most 1e13 on a CPU "
                   "(minutes) or 1e16 on a GPU (and fit in its free memory), and says so when it skips it.")
@click.option("--top-k", "-k", type=int, default=2, show_default=True, help="Experts per token.")
@click.option("--format", default="auto", show_default=True, type=click.Choice(FORMATS),
              help="Output MoE format.")
@click.option("--router-init", default="auto", show_default=True, type=click.Choice(ROUTER_INITS.names),
              help="Router rows: " + ROUTER_INITS.help)
@click.option("--router-fit", default=FITS_DEFAULT, show_default=True, type=click.Choice(ROUTER_FITS.names),
              help="How calibrated routers are fitted per layer: " + ROUTER_FITS.help)
@calibration_options(MergeOptions, multiple=True, metavar="NAME=FILE", tokens="Calibration tokens used per domain.",
                     calibration="Text (or token ids .npy/.pt/.jsonl) of an expert's domain. Repeat per expert.")
@click.option("--router-seed", type=int, default=0, show_default=True,
              help="Seed of the merge's random draws: --router-init normal, mergekit's noise_scale.")
@dtype_option
@run_options
@output_options
def command(out, output, **options):
    """Merge domain-trained copies of one seed model into a Mixture-of-Experts (Branch-Train-MiX).

    \b
    surgery merge OUT --seed seed --expert code=code --expert prose=prose --calibration code=code.txt ...
    surgery merge OUT --config merge.yml
    """
    context = click.get_current_context()
    given = {name for name in options if context.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    run(out, MergeOptions(**options), output, given=given)


def run(out, options: MergeOptions, output: OutputOptions = OutputOptions(), given=frozenset()):
    """Merge into OUT as `options` say (the command and ``surgery.merge`` both land here); returns a ``Result``.
    With a --config file, the options in `given` (given explicitly) override the file's."""
    settings = options.run
    settings.check()
    output.check()
    spec = options.spec(given)
    spec.router_init = resolve_router_init(spec)
    spec.non_ffn = resolve_non_ffn(spec)
    if spec.head_fit and spec.non_ffn != "regmean++":
        raise SurgeryError("--head-fit refits the head of a RegMean++ merge, and this merge's --non-ffn is "
                           f"{spec.non_ffn} (RegMean++ needs calibrated routers and --calibration text for every expert)")
    merge = open_merge(spec)
    try:
        return run_merge(merge, Path(out), output, settings)
    finally:
        for member in merge.members:
            member.checkpoint.close()
