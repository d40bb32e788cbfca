"""`surgery merge`: Branch-Train-MiX. Domain-trained copies of one seed become one MoE.

FFN of layer l of model i -> expert i of MoE layer l (bit-exact copies); ``--include-seed`` adds the
seed's FFN as one more expert (the BTX paper's generalist). Every other tensor (embeddings,
attention, norms, lm_head) is the weighted mean of all models (seed included when given),
computed in float32 and cast to the output dtype, one output tensor at a time; ``--non-ffn
seed|NAME`` copies one model's instead (mergekit-moe's behaviour). Routers: see
``surgery.btx_router``.

Memory: the zero, normal and embedding inits stream (about one tensor in memory, like every
plan). The calibrated init writes the merge as a draft beside OUT with its routers deferred, runs the
draft layer by layer (``surgery.btx_router.fit_calibrated``) and writes the fitted rows into it before
it becomes OUT: peak memory is one merged decoder layer in the compute dtype plus the calibration
hidden states, and every weight is read and averaged once.
"""

from __future__ import annotations

from pathlib import Path

import click

from surgery import families as arch
from surgery import console
from surgery.errors import SurgeryError
from surgery.merge_config import FITS_DEFAULT, MergeSpec
from surgery.merge_model import Merge, open_merge, reference_tokenizer, resolve_non_ffn, resolve_router_init
from surgery.merge_plan import build_plan, model_card
from surgery.merge_regmean import RegMeanTensor
from surgery.execution.session import RunSettings, run_options
from surgery.operations.output import OutputOptions, PostWriteCheck, dtype_option, output_options, write
from surgery.plan import Plan
from surgery.recipes import Deferred


# ------------------------------------------------------------------ running
def run_merge(merge: Merge, out: Path, output: OutputOptions = OutputOptions(), settings=None):
    """Write the merge (calibrated routers: fitted on the written draft); returns a ``Result``."""
    from surgery.execution.session import RunSettings

    output.check()
    settings = settings or RunSettings()
    from surgery.layouts import convert

    automatic = merge.spec.head_fit is None
    merge.spec.head_fit = bool(merge.spec.head_fit)
    plan = convert(build_plan(merge), output.layout)  # before the deferred routers are named
    regmean_head = any(isinstance(t.recipe, RegMeanTensor) and t.recipe.layer is None for t in plan.tensors)
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
    from surgery.execution.placement import free_gpu_memory
    from surgery.head_fit import auto_skip_reason

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
    from surgery.btx_router import PendingRouter, calibration_parts, fit_calibrated, print_routing, routing_table_text
    from surgery.checkpoint import Checkpoint
    from surgery.execution.skeleton import import_in_background
    from surgery.execution.weights import ModelWeights
    from surgery.io.deferred import Filled
    from surgery.execution.calibration import CalibrationSet
    from surgery.merge_regmean import MergedInputs, RegMeanTensor, fit_regmean, set_token_counts
    from surgery.writer import check_output_path

    check_output_path(out, plan.sources, output.force)
    parts = calibration_parts(merge, reference_tokenizer(merge))  # a bad calibration text is refused before writing
    set_token_counts(merge, plan, parts)
    names = {d.expert: d.name for d in merge.domains()}
    routers = {t.name: t.recipe for t in plan.tensors if isinstance(t.recipe, PendingRouter)}

    def fill(draft: Path, patch) -> Filled:
        importing.join(timeout=120)  # no import of the same modules from two threads at once
        plus = merge.spec.non_ffn == "regmean++"
        if any(isinstance(t.recipe, RegMeanTensor) for t in plan.tensors) and not plus:
            fit_regmean(merge, plan, parts, check.settings, patch, spill_dir=out.resolve().parent)
        if not routers and not plus:
            return Filled({})
        console.info(f"calibrated routers: running the merged model layer by layer on {len(names)} domains "
                     f"({', '.join(names.values())}) and fitting {len(routers)} routers"
                     + (" and shared-expert gates" if merge.shared_gate == "fitted" else ""))
        with Checkpoint.open(draft) as checkpoint:
            merged_inputs = MergedInputs(merge, plan, CalibrationSet.combine(parts), check.settings, patch,
                                         out.resolve().parent) if plus else None
            fit = fit_calibrated(merge, ModelWeights.from_checkpoint(checkpoint), parts, check.settings,
                                 spill_dir=out.resolve().parent, merged_inputs=merged_inputs)
        domain_names = [names[e] for e in sorted(names)]
        expert_names = [m.name for m in merge.experts]
        print_routing(fit, domain_names, expert_names)
        card = model_card(merge, routing_table_text(fit, domain_names, expert_names))
        return Filled({name: fit.rows(r.kind)[r.layer] for name, r in routers.items()}, {"README.md": card})

    importing = import_in_background(merge.config["model_type"])  # while the draft is written
    return write(plan, out, output, check=check, fill=fill)


# ------------------------------------------------------------------ command line
@click.command("merge")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--expert", "expert", multiple=True, metavar="NAME=PATH",
              help="A domain-trained model; its FFNs become expert i (in the order given). Repeat per expert.")
@click.option("--config", "config_file", type=click.Path(path_type=str),
              help="A YAML file with the merge (ours or a mergekit-moe config); options given here override it.")
@click.option("--seed", "seed", metavar="PATH", help="The seed model the experts were branched from (averaged in).")
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
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", *arch.moe_formats()]), help="Output MoE format.")
@click.option("--router-init", default="auto", show_default=True,
              type=click.Choice(["auto", "zero", "normal", "embedding", "calibrated"]),
              help="auto: calibrated when every expert has --calibration text, else normal (a zero router ties every logit).")
@click.option("--router-fit", default=FITS_DEFAULT, show_default=True, type=click.Choice(["logistic", "class-mean"]),
              help="How calibrated routers are fitted per layer.")
@click.option("--calibration", multiple=True, metavar="NAME=FILE", help="Text of an expert's domain. Repeat per expert.")
@click.option("--calibration-tokens", type=int, default=16384, show_default=True,
              help="Calibration tokens used per domain.")
@click.option("--router-seed", type=int, default=0, show_default=True,
              help="Seed of the merge's random draws: --router-init normal, mergekit's noise_scale.")
@dtype_option
@run_options
@output_options
def command(out, expert, config_file, seed, include_seed, weights, non_ffn, head_fit, top_k, fmt, router_init,
            router_fit, calibration, calibration_tokens, router_seed, dtype, device, memory_budget, compute_dtype,
            output):
    """Merge domain-trained copies of one seed model into a Mixture-of-Experts (Branch-Train-MiX).

    \b
    surgery merge OUT --seed seed --expert code=code --expert prose=prose --calibration code=code.txt ...
    surgery merge OUT --config merge.yml
    """
    from surgery.merge_config import check_spec, load_config, spec_from_options

    values = dict(expert=expert, seed=seed, include_seed=include_seed, weights=weights, non_ffn=non_ffn, top_k=top_k,
                  fmt=fmt, router_init=router_init, router_fit=router_fit, calibration=calibration, dtype=dtype,
                  router_seed=router_seed, calibration_tokens=calibration_tokens, head_fit=head_fit)
    if config_file:
        if expert:
            raise SurgeryError(f"--config {config_file} lists the experts; do not also give --expert")
        spec = load_config(config_file)
        _override(spec, values, click.get_current_context())
        check_spec(spec, where=str(config_file))
    else:
        spec = spec_from_options(expert, seed, include_seed, weights, non_ffn, top_k, fmt, router_init, calibration,
                                 dtype, router_seed, calibration_tokens, router_fit, head_fit)
    run(spec, out, output, RunSettings(device, memory_budget, compute_dtype))


def run(spec: MergeSpec, out, output: OutputOptions = OutputOptions(), settings=None):
    """Merge as `spec` says into OUT (the command and ``surgery.merge`` both land here); returns a ``Result``."""
    settings = settings or RunSettings()
    settings.check()
    output.check()
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


def _override(spec: MergeSpec, values: dict, ctx) -> None:
    """Options given on the command line win over the YAML file."""
    from click.core import ParameterSource

    from surgery.merge_config import parse_weights, read_calibration

    def given(name):
        return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE

    simple = {"seed": "seed", "include_seed": "include_seed", "non_ffn": "non_ffn", "top_k": "top_k", "fmt": "format",
              "router_init": "router_init", "router_fit": "router_fit", "dtype": "dtype", "router_seed": "router_seed",
              "calibration_tokens": "calibration_tokens", "head_fit": "head_fit"}
    for option, attribute in simple.items():
        if given(option):
            setattr(spec, attribute, values[option])
    if given("fmt"):
        spec.format_choices = ()  # --format wins over a mergekit architecture
    if given("weights"):
        spec.weights.update(parse_weights(values["weights"]))
    if given("calibration"):
        from surgery.merge_config import parse_pair

        for item in values["calibration"]:
            name, path = parse_pair(item, "--calibration", "FILE")
            spec.calibration[name] = read_calibration(path)
