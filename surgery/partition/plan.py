"""The split plan: each dense FFN's neurons divided among N smaller experts (LLaMA-MoE, MoEfication).

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
plan is built after reading each layer's FFN once, one layer at a time (``surgery.partition.calibrated``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from surgery import families as arch
from surgery.errors import SurgeryError, check_choice
from surgery.execution.loading import has_tokenizer
from surgery.execution.routers import registry as router_registry
from surgery.execution.routers.request import RouterRequest
from surgery.io.dtypes import parse_dtype, set_config_dtype
from surgery.partition import STRATEGIES, default_shared, files, strategy
from surgery.partition.notes import plan_notes
from surgery.plan.moe import (check_expert_counts, dense_ffn_names, folded_rounding, inert_shared_expert,
                              inert_shared_ffn, moe_tensors, parse_moe_layers, provenance)
from surgery.plan.nodes import Columns, Concat, Constant, Copy, Init, PadRows, Rows, Scale
from surgery.plan.plan import Plan
from surgery.seeds import router_seed

ROUTERS = router_registry.offered(  # --router-init
    "auto", "zero", "normal", "centroid", "calibrated", calibrated="ridge",
    auto="zero at K = N, where the split is exact; calibrated at K < N, on --calibration or the shipped sample text")
CLUSTER_ON = ("up", "gate", "gate+up")
AUTO_SCALE = "sqrt(K*N)"  # measured by bench/bench_split.py: see docs/split.md
ROUTER_STD = 0.02


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


def _resolve(source, family, options):
    """Check every option against the model before any heavy work; returns the facts the plan needs."""
    where = source.directory / "config.json"
    target = arch.moe_target(family, options.format, source.config, where)
    dims = arch.dimensions(family, source.config, where)
    ffn, n, k = dims["ffn"], options.num_experts, options.top_k
    check_expert_counts(n, k)
    if n > ffn:
        raise SurgeryError(f"--num-experts {n}: more experts than the FFN has neurons (intermediate_size {ffn})")
    check_choice("--router-init", options.router_init, ROUTERS.names)
    check_choice("--cluster-on", options.cluster_on, CLUSTER_ON)
    if options.strategy is None and options.partition is None:
        raise SurgeryError("--strategy is required (or --partition FILE to reuse a saved split)")
    if options.strategy is not None and options.strategy not in STRATEGIES:
        raise SurgeryError(f"--strategy {options.strategy!r} is not a split strategy (expected one of: {', '.join(STRATEGIES)})")
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


def shared_count(options, ffn: int) -> int:
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


def resolve_router_init(options, source) -> tuple:
    """`--router-init auto`, settled before any work: (the options with the router chosen, the note that says what
    was chosen and why, or None).

    k = N: the zero router (every weight 1/N: with expert scale N the split is exact). k < N: a zero
    router ties every logit, so every token would use the same k experts (which ones depends on how an
    engine breaks ties), and a normal router is little better (docs/split.md); the calibrated router,
    fitted on --calibration or the shipped sample text, uses every expert and lost least. A model with
    no tokenizer and no --calibration file cannot read text: the data-free centroid router then.
    """
    if options.router_init != "auto":
        return options, None
    n, k = options.num_experts, options.top_k
    if k == n:
        return replace(options, router_init="zero"), None
    if options.calibration is not None or has_tokenizer(source.directory):
        text = options.calibration or "the shipped sample text"
        return replace(options, router_init="calibrated"), (
            f"router: calibrated on {text} (--router-init auto at top-{k} of {n}; a zero router would send every "
            f"token to the same {k} experts)")
    return replace(options, router_init="centroid"), (
        f"router: centroid (--router-init auto at top-{k} of {n}: {source.directory.name} has no tokenizer and no "
        f"--calibration file was given, so the router comes from the weights alone; give --calibration FILE of "
        f"token ids for a calibrated router)")


def needs_calibration(options) -> bool:
    uses_stats = options.partition is None and bool(strategy(options.strategy).NEEDS)
    return uses_stats or options.router_init == "calibrated"


def load_calibration(source, options):
    """The calibration set (refuses unusable data before any heavy work)."""
    from surgery.execution.calibration import CalibrationSet  # lazy: tokenising imports torch (not for --help)

    return CalibrationSet.load(options.calibration, source.directory, source.config, options.calibration_tokens)


def given_partitions(options, ffn: int, layers: list[int]) -> tuple:
    """(the options with the file's strategy where none was given, the partitions loaded from --partition FILE and
    checked against the model, or None)."""
    if options.partition is None:
        return options, None
    meta, partitions = files.load(options.partition)
    files.check_matches(options.partition, meta, partitions, ffn=ffn, num_experts=options.num_experts,
                        layers=layers, strategy=options.strategy)
    return replace(options, strategy=options.strategy or meta.get("strategy")), partitions


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
    return np.minimum(np.maximum(holders, 1), top_k).astype(np.float64)


def build_plan(source, family, options, *, calibration=None, partitions=None, spill_dir=None):
    """The MoE plan. `partitions` (and `calibration`) may be passed in to reuse work (benchmarks);
    `spill_dir`: where calibration may spill hidden states (beside the output)."""
    target, dims, layers, scale = _resolve(source, family, options)
    ffn, n, k = dims["ffn"], options.num_experts, options.top_k
    options, router_note = resolve_router_init(options, source)
    given = partitions
    if partitions is None:
        options, given = given_partitions(options, ffn, layers)
    shared = shared_count(options, ffn) if given is None else 0  # refuses bad sizes before calibration
    needed = needs_calibration(options) if given is None else options.router_init == "calibrated"
    if needed and calibration is None:
        calibration = load_calibration(source, options)
    from surgery.partition.calibrated import partition_layers  # lazy: runs the model (not for --help)

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
                return Constant(routers[layer], f"{options.router_init} router rows")
            return router_registry.node(ROUTERS.method(options.router_init),
                                        RouterRequest(n, hidden, seed=router_seed(options.seed, layer), std=ROUTER_STD))
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
    notes = ([router_note] if router_note else []) + plan_notes(partitions, layout, target, options, scale, ffn, summary,
                                                                 hits)
    factors = {factor for layer, p in partitions.items() for j in range(n)
               for _, factor in neuron_groups(p, j, scale, k, layout.duplicated, holders[layer])}
    factors |= {1.0 / target.shared_scale} if not layout.duplicated and any(len(p.shared) for p in partitions.values()) else set()
    stored = dtype or source.info(dense_ffn_names(family, layers[0])["down"]).dtype
    return Plan("split", tensors, config, [source], side_files=source.side_files(),
                metadata=provenance([source], {"operation": "split", **options.record(), "scale": scale}), notes=notes,
                rounding=folded_rounding(factors, stored), dequantize=dtype is not None)  # --dtype widens, as copy's
