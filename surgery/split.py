"""`surgery split`: divide each dense FFN's neurons among N smaller experts (LLaMA-MoE, MoEfication).

Expert j of a layer holds a neuron set S_j: rows S_j of gate_proj and up_proj, columns S_j of
down_proj. When the sets cover every neuron once, the sum of all experts is the dense FFN; the
MoE's renormalised top-k weights are 1/N each under a zero router with k = N, so folding the
expert scale N into down_proj reproduces the dense model exactly. Shared neurons (used by every
token) become a Qwen2-MoE shared expert (its gate is zero, sigmoid(0) = 0.5, so its down_proj is
doubled) or are duplicated into every routed expert with unscaled down columns: the top-k weights
sum to one, so their contribution is counted exactly once for any router. Neurons held by c
experts (sharing-inner) get the expert scale divided by min(c, k). Uneven expert sizes are padded
with zero neurons, which add nothing.

Partitions need the weights (and, for the data-driven strategies, calibration statistics), so the
plan is built after reading each layer's FFN once, one layer at a time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import click

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.moe_plan import check_expert_counts, inert_shared_expert, inert_shared_ffn
from surgery.execution.session import RunsModel, run_options
from surgery.operations.output import (OutputOptions, PostWriteCheck, check_choice, dtype_option, output_options,
                                      write)
from surgery.seeds import router_seed

STRATEGY_NAMES = ("random", "clustering", "sharing-inner", "sharing-inter", "shared-norm", "coactivation")
ROUTER_INITS = ("auto", "zero", "normal", "centroid", "calibrated")
FORMATS = ("auto", *arch.moe_formats())
CLUSTER_ON = ("up", "gate", "gate+up")
NAMED_SCALES = ("auto", "K", "N/K", "N")
AUTO_SCALE = "sqrt(K*N)"  # measured by bench/bench_split.py: see docs/split.md
ROUTER_STD = 0.02


@dataclass
class SplitOptions(RunsModel):
    num_experts: int
    top_k: int
    strategy: str | None = None
    format: str = "auto"
    shared_neurons: int | None = None
    shared_fraction: float | None = None
    cluster_on: str = "up"
    calibration: str | None = None  # None: surgery.samples.SAMPLE_TEXT
    calibration_tokens: int = 8192
    router_init: str = "auto"
    expert_scale: str = "auto"
    seed: int = 0
    moe_layers: str = "all"
    partition: str | None = None
    save_partition: str | None = None
    dtype: str = "keep"
    device: str = "auto"
    memory_budget: str | None = None
    compute_dtype: str = "auto"

    def record(self) -> dict:
        """The options as written into the output's metadata (paths as given)."""
        return {key: value for key, value in asdict(self).items() if key != "save_partition"}


def resolve_expert_scale(text: str, num_experts: int, top_k: int) -> float:
    """The factor folded into each expert's down_proj: auto (= sqrt(K*N)), K, N/K, N or a positive number.

    Under renormalised top-k weights (about 1/K each) an expert scale s makes the layer output
    s/K times the sum of the selected experts: s = K sums them (MoEfication), s = N is the unbiased
    estimate of the dense FFN under a random choice of experts. A router that picks the experts
    holding most of the activation lies between the two; the geometric mean sqrt(K*N) lost least
    on the demo model for every router init, and equals N at K = N, where the split is exact.
    """
    text = str(text).strip()
    named = {"K": top_k, "N/K": num_experts / top_k, "N": num_experts, "sqrt(K*N)": (top_k * num_experts) ** 0.5}
    if text == "auto":
        return float(named[AUTO_SCALE])
    if text in named:
        return float(named[text])
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise SurgeryError(f"--expert-scale {text!r}: expected auto, K, N/K, N, sqrt(K*N) or a positive number")
    return value


@dataclass
class Layout:
    """Sizes shared by every layer (config.json holds one value each)."""

    expert_ffn: int
    shared_ffn: int  # qwen2_moe shared expert (the format always has one: inert when no neuron is shared)
    duplicated: bool  # shared neurons copied into every routed expert


def _resolve(source, family, options: SplitOptions):
    """Check every option against the model before any heavy work; returns the facts the plan needs."""
    from surgery.moe_plan import parse_moe_layers

    where = source.directory / "config.json"
    target = arch.moe_target(family, options.format, source.config, where)
    dims = arch.dimensions(family, source.config, where)
    ffn, n, k = dims["ffn"], options.num_experts, options.top_k
    check_expert_counts(n, k)
    if n > ffn:
        raise SurgeryError(f"--num-experts {n}: more experts than the FFN has neurons (intermediate_size {ffn})")
    check_choice("--router-init", options.router_init, ROUTER_INITS)
    check_choice("--cluster-on", options.cluster_on, CLUSTER_ON)
    if options.strategy is None and options.partition is None:
        raise SurgeryError("--strategy is required (or --partition FILE to reuse a saved split)")
    if options.strategy is not None and options.strategy not in STRATEGY_NAMES:
        raise SurgeryError(f"--strategy {options.strategy!r} is not a split strategy (expected one of: {', '.join(STRATEGY_NAMES)})")
    if options.shared_neurons is not None and options.shared_fraction is not None:
        raise SurgeryError("--shared-neurons and --shared-fraction are alternatives: give one")
    if options.partition is not None and (options.shared_neurons is not None or options.shared_fraction is not None):
        raise SurgeryError(f"--partition {options.partition} fixes the shared neurons; drop --shared-neurons/--shared-fraction")
    if options.calibration_tokens < 2:
        raise SurgeryError(f"--calibration-tokens {options.calibration_tokens}: expected at least 2")
    options.run.check()
    scale = resolve_expert_scale(options.expert_scale, n, k)
    layers = parse_moe_layers(options.moe_layers, dims["layers"])
    return target, dims, layers, scale


def shared_count(options: SplitOptions, ffn: int) -> int:
    from surgery.partition import default_shared

    n = options.num_experts
    if options.shared_neurons is not None:
        count = options.shared_neurons
        label = f"--shared-neurons {count}"
    elif options.shared_fraction is not None:
        if not 0 <= options.shared_fraction < 1:
            raise SurgeryError(f"--shared-fraction {options.shared_fraction}: expected a fraction in [0, 1)")
        count = int(round(options.shared_fraction * ffn))
        label = f"--shared-fraction {options.shared_fraction}"
    else:
        return default_shared(options.strategy, ffn, n)
    if not 0 <= count <= ffn - n:
        raise SurgeryError(f"{label}: expected 0 to {ffn - n} shared neurons (intermediate_size {ffn}, "
                           f"each of the {n} experts needs at least one neuron)")
    return count


def resolve_router_init(options: SplitOptions, source) -> str | None:
    """`--router-init auto`, settled before any work; returns the note that says what was chosen and why.

    k = N: the zero router (every weight 1/N: with expert scale N the split is exact). k < N: a zero
    router ties every logit, so every token would use the same k experts (which ones depends on how an
    engine breaks ties), and a normal router is little better (docs/split.md); the calibrated router,
    fitted on --calibration or the shipped sample text, uses every expert and lost least. A model with
    no tokenizer and no --calibration file cannot read text: the data-free centroid router then.
    """
    from surgery.loading import has_tokenizer

    if options.router_init != "auto":
        return None
    n, k = options.num_experts, options.top_k
    if k == n:
        options.router_init = "zero"
        return None
    if options.calibration is not None or has_tokenizer(source.directory):
        options.router_init = "calibrated"
        text = options.calibration or "the shipped sample text"
        return (f"router: calibrated on {text} (--router-init auto at top-{k} of {n}; a zero router would send "
                f"every token to the same {k} experts)")
    options.router_init = "centroid"
    return (f"router: centroid (--router-init auto at top-{k} of {n}: {source.directory.name} has no tokenizer and no "
            f"--calibration file was given, so the router comes from the weights alone; give --calibration FILE of "
            f"token ids for a calibrated router)")


def needs_calibration(options: SplitOptions) -> bool:
    from surgery.partition import strategy

    uses_stats = options.partition is None and bool(strategy(options.strategy).NEEDS)
    return uses_stats or options.router_init == "calibrated"


def load_calibration(source, options: SplitOptions):
    """The calibration set (refuses unusable data before any heavy work)."""
    from surgery.execution.calibration import CalibrationSet

    return CalibrationSet.load(options.calibration, source.directory, source.config, options.calibration_tokens)


def given_partitions(options: SplitOptions, ffn: int, layers: list[int]) -> dict | None:
    """Partitions loaded from --partition FILE (checked against the model), or None."""
    from surgery.partition import files

    if options.partition is None:
        return None
    meta, partitions = files.load(options.partition)
    files.check_matches(options.partition, meta, partitions, ffn=ffn, num_experts=options.num_experts,
                        layers=layers, strategy=options.strategy)
    options.strategy = options.strategy or meta.get("strategy")
    return partitions


def layout_for(partitions: dict, target) -> Layout:
    duplicated = not target.shared_expert
    largest_shared = max(len(p.shared) for p in partitions.values())
    expert_ffn = max(p.largest_expert + (len(p.shared) if duplicated else 0) for p in partitions.values())
    return Layout(expert_ffn, 0 if duplicated else largest_shared or inert_shared_ffn(target) or 0, duplicated)


def neuron_groups(partition, expert: int, scale: float, top_k: int, duplicated: bool, holders) -> list[tuple[list, float]]:
    """[(neurons, down_proj factor)] for one expert, in output row order: routed neurons grouped by
    factor (scale / min(holders, k)), then duplicated shared neurons (factor 1)."""
    routed = partition.experts[expert]
    factors = scale / min_holders(holders[routed], top_k)
    groups = [(routed[factors == factor].tolist(), float(factor)) for factor in sorted(set(factors.tolist()), reverse=True)]
    if duplicated and len(partition.shared):
        groups.append((partition.shared.tolist(), 1.0))
    return groups


def min_holders(holders, top_k: int):
    import numpy as np

    return np.minimum(np.maximum(holders, 1), top_k).astype(np.float64)


def build_plan(source, family, options: SplitOptions, *, calibration=None, partitions=None, spill_dir=None):
    """The MoE plan. `partitions` (and `calibration`) may be passed in to reuse work (benchmarks);
    `spill_dir`: where calibration may spill hidden states (beside the output)."""
    from surgery.checkpoint import parse_dtype, set_config_dtype
    from surgery.moe_plan import dense_ffn_names, folded_rounding, moe_tensors, provenance
    from surgery.partition import files
    from surgery.partition.calibrated import partition_layers
    from surgery.plan import Plan
    from surgery.recipes import Columns, Concat, Constant, Copy, Init, PadRows, Rows, Scale

    target, dims, layers, scale = _resolve(source, family, options)
    ffn, n, k = dims["ffn"], options.num_experts, options.top_k
    router_note = resolve_router_init(options, source)
    given = partitions if partitions is not None else given_partitions(options, ffn, layers)
    shared = shared_count(options, ffn) if given is None else 0  # refuses bad sizes before calibration
    needed = needs_calibration(options) if given is None else options.router_init == "calibrated"
    if needed and calibration is None:
        calibration = load_calibration(source, options)
    splits = partition_layers(source, family, options, layers, ffn, shared, calibration=calibration, given=given,
                              settings=options.run, spill_dir=spill_dir)
    partitions, routers, hits = splits.partitions, splits.routers, splits.hits
    summary = f"partition from {options.partition}" if options.partition is not None else splits.summary
    if options.save_partition:
        files.save(options.save_partition, partitions, strategy=options.strategy or "given", ffn=ffn)

    layout = layout_for(partitions, target)
    dense_layers = [layer for layer in range(dims["layers"]) if layer not in layers]
    config = arch.moe_config(family, source.config, target, num_experts=n, top_k=k, expert_ffn=layout.expert_ffn,
                             shared_ffn=layout.shared_ffn or None, dense_layers=dense_layers,
                             where=source.directory / "config.json")
    dtype = None if options.dtype in (None, "keep") else parse_dtype(options.dtype)
    set_config_dtype(config, dtype)
    holders = {layer: p.holders(ffn) for layer, p in partitions.items()}
    hidden = dims["hidden"]

    def ffn_recipe(expected):
        layer = expected.layer
        names = dense_ffn_names(family, layer)
        if expected.group == "ffn":
            return Copy(source, names[expected.role])
        partition = partitions[layer]
        if expected.group == "router":
            if options.router_init in ("centroid", "calibrated"):
                import torch

                return Constant(torch.as_tensor(routers[layer]), f"{options.router_init} router rows")
            if options.router_init == "normal":
                return Init("normal", (n, hidden), seed=router_seed(options.seed, layer), std=ROUTER_STD)
            return Init("zero", (n, hidden))
        if expected.group == "shared_expert":
            size = layout.shared_ffn
            neurons = partition.shared.tolist()
            if not neurons:
                return inert_shared_expert(expected)
            if expected.role == "shared_gate":
                return Init("zero", expected.shape)  # sigmoid(0) = 0.5, made up for by down_proj / 0.5
            if expected.role == "down":  # the model adds target.shared_scale of the shared output
                columns = Columns(source, names["down"], neurons)
                recipe = columns if target.shared_scale == 1.0 else Scale(columns, 1.0 / target.shared_scale)
                return recipe if len(neurons) == size else PadRows(recipe, size, -1)
            recipe = Rows(source, names[expected.role], neurons)
            return recipe if len(neurons) == size else PadRows(recipe, size, 0)
        groups = neuron_groups(partition, expected.expert, scale, k, layout.duplicated, holders[layer])
        count = sum(len(neurons) for neurons, _ in groups)
        if expected.role == "down":
            parts = [Columns(source, names["down"], neurons) if factor == 1.0 else
                     Scale(Columns(source, names["down"], neurons), factor) for neurons, factor in groups]
            recipe = parts[0] if len(parts) == 1 else Concat(parts, dim=-1)
            return recipe if count == layout.expert_ffn else PadRows(recipe, layout.expert_ffn, -1)
        recipe = Rows(source, names[expected.role], [i for neurons, _ in groups for i in neurons])
        return recipe if count == layout.expert_ffn else PadRows(recipe, layout.expert_ffn, 0)

    tensors = moe_tensors(target, config, source, family, ffn_recipe, dtype=dtype)
    from surgery.partition.notes import plan_notes

    notes = ([router_note] if router_note else []) + plan_notes(partitions, layout, target, options, scale, ffn, summary,
                                                                 hits)
    factors = {factor for layer, p in partitions.items() for j in range(n)
               for _, factor in neuron_groups(p, j, scale, k, layout.duplicated, holders[layer])}
    factors |= {1.0 / target.shared_scale} if not layout.duplicated and any(len(p.shared) for p in partitions.values()) else set()
    stored = dtype or source.info(dense_ffn_names(family, layers[0])["down"]).dtype
    return Plan("split", tensors, config, [source], side_files=source.side_files(),
                metadata=provenance([source], {"operation": "split", **options.record(), "scale": scale}), notes=notes,
                rounding=folded_rounding(factors, stored))


@click.command("split")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--num-experts", "-n", type=int, required=True, help="Experts per MoE layer (N >= 2).")
@click.option("--top-k", "-k", type=int, required=True, help="Experts each token uses (1..N; K = N is exact).")
@click.option("--strategy", default=None,
              help="How neurons are divided: random, clustering, sharing-inner, sharing-inter, shared-norm, coactivation.")
@click.option("--format", "fmt", default="auto", show_default=True,
              help=f"Output format: auto ({arch.auto_formats()}), {', '.join(arch.moe_formats())}.")
@click.option("--shared-neurons", type=int, default=None, help="Neurons shared by every token (default: 0; "
              "sharing-inter and shared-norm: the size of one expert).")
@click.option("--shared-fraction", type=float, default=None, help="Shared neurons as a fraction of the FFN.")
@click.option("--cluster-on", default="up", show_default=True, help="clustering: rows of up, gate or gate+up.")
@click.option("--calibration", default=None, help="Calibration text (or token ids .jsonl/.npy/.pt) for sharing-*, "
              "coactivation and --router-init calibrated (default: the shipped sample text).")
@click.option("--calibration-tokens", type=int, default=8192, show_default=True, help="Calibration tokens used at most.")
@click.option("--router-init", default="auto", show_default=True,
              help="auto (zero at K = N, where the split is exact; calibrated at K < N, on --calibration or the shipped "
                   "sample text), zero, normal, centroid or calibrated.")
@click.option("--expert-scale", default="auto", show_default=True,
              help=f"Factor folded into each expert's down_proj: auto (= {AUTO_SCALE}), K, N/K, N or a number.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--moe-layers", default="all", show_default=True, help="all, every-other or a list like 0,2,5-7 "
              "(qwen formats only; other layers stay dense).")
@click.option("--save-partition", default=None, help="Write the neuron assignment to FILE (.json or .npz).")
@click.option("--partition", "partition_file", default=None, help="Reuse a neuron assignment saved with --save-partition.")
@dtype_option
@run_options
@output_options
def command(src, out, num_experts, top_k, strategy, fmt, shared_neurons, shared_fraction, cluster_on, calibration,
            calibration_tokens, router_init, expert_scale, seed, moe_layers, save_partition, partition_file, dtype,
            device, memory_budget, compute_dtype, output):
    """Split each FFN of the dense model SRC into N experts and write the MoE to OUT."""
    options = SplitOptions(num_experts, top_k, strategy, fmt, shared_neurons, shared_fraction, cluster_on, calibration,
                           calibration_tokens, router_init, expert_scale, seed, moe_layers, partition_file,
                           save_partition, dtype, device, memory_budget, compute_dtype)
    run(src, out, options, output)


def run(src, out, options: SplitOptions, output: OutputOptions = OutputOptions()):
    """Split SRC into OUT (the command and ``surgery.split`` both land here); returns a ``Result``."""
    from surgery.moe_plan import open_dense_source
    from surgery.writer import check_output_path

    output.check()
    source, family = open_dense_source(src)
    with source:
        if not output.dry_run:
            check_output_path(Path(out), [source], output.force)  # before the (possibly long) partitioning
        plan = build_plan(source, family, options, spill_dir=Path(out).resolve().parent)
        exact = options.top_k == options.num_experts and options.router_init == "zero" and \
            resolve_expert_scale(options.expert_scale, options.num_experts, options.top_k) == options.num_experts
        return write(plan, Path(out), output, check=PostWriteCheck([src], exact=exact, settings=options.run))


# `surgery.split(...)`: this module is also the API function (surgery.api.split)
from surgery.api import callable_module  # noqa: E402

callable_module(__name__, ["src", "out", "num_experts", "top_k"], SplitOptions)
