"""The upcycle plan: each FFN copied into N experts (Sparse Upcycling), a router added, the rest copied.

Every expert starts as the dense FFN (or, with ``--granularity G``, as one of G neuron shards of it), a
router is added, every other tensor is copied. The weights are chosen so that the MoE model computes exactly
what the dense model computed, for any router and any top-k (the maths is in docs/upcycle.md):

- plain: renormalised top-k weights sum to 1 and all experts are equal, so sum_i w_i FFN(x) = FFN(x);
- granular: expert e is shard e % G of copy e // G; router rows are drawn per copy and repeated
  G times, so top-k (k a multiple of G) selects whole copies, and down_proj is scaled by G;
- Qwen2-MoE shared expert: the shared expert is the dense FFN and its gate is zero, so it adds
  sigmoid(0) FFN(x) = FFN(x) / 2; routed experts have down_proj scaled by 1/2 and add the other half;
- Qwen2-MoE without --shared-expert: an inert all-zero shared expert (the format always has one).

The plan is built from headers (plus, for ``--router-init calibrated``, a layer-by-layer run of the source on
calibration text, ``surgery.upcycling.routers``) and written by the streaming writer one tensor at a time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.execution.routers import registry as router_registry
from surgery.execution.routers.request import RouterRequest
from surgery.families import Expected
from surgery.io.dtypes import parse_dtype, set_config_dtype
from surgery.plan.diversity import ExpertDiversity, choose_neurons, matrix_stats, stream_seed
from surgery.plan.moe import (dense_ffn_names, folded_rounding, inert_shared_expert, inert_shared_ffn,
                              inert_shared_note, moe_tensors, parse_moe_layers, provenance)
from surgery.plan.nodes import Apply, Columns, Constant, Copy, Recipe, Rows, Scale
from surgery.plan.plan import Plan
from surgery.plan.sources import open_dense_source
from surgery.seeds import router_seed

ROUTERS = router_registry.offered("normal", "uniform", "zero", "calibrated", calibrated="kmeans")  # --router-init
SHARED_HALF = 0.5  # with --shared-expert, the routed experts and the shared expert each add half the dense FFN


def build_plan(src, options, spill_dir=None) -> Plan:
    """The upcycle plan of the dense checkpoint `src` for `options` (``surgery.upcycle.UpcycleOptions``, checked);
    `spill_dir`: where calibration may spill hidden states (beside the output)."""
    source, family = open_dense_source(src)
    where = source.directory / "config.json"
    target = arch.moe_target(family, options.format, source.config, where)
    dims = arch.dimensions(family, source.config, where)
    ffn, hidden, layers = dims["ffn"], dims["hidden"], dims["layers"]
    g = options.granularity
    if ffn % g:
        raise SurgeryError(f"{where}: intermediate_size {ffn} is not divisible by --granularity {g} "
                           f"(divisors: {', '.join(str(d) for d in _divisors(ffn) if d > 1)})")
    moe_layers = parse_moe_layers(options.moe_layers, layers)
    dense_layers = [layer for layer in range(layers) if layer not in moe_layers]
    if options.shared_expert and not target.shared_expert:
        with_shared = ", ".join(name for name, f in arch.FAMILIES.items() if f.shared_expert and name in family.conversions)
        raise SurgeryError(f"--shared-expert: format {target.name} has no shared expert"
                           + (f" (use --format {with_shared})" if with_shared else f" (no format {family.name} can "
                              "become has one)"))
    shared_ffn = ffn if options.shared_expert and target.shared_expert else inert_shared_ffn(target)
    config = arch.moe_config(family, source.config, target, num_experts=options.num_experts, top_k=options.top_k,
                             expert_ffn=ffn // g, shared_ffn=shared_ffn, dense_layers=dense_layers, where=where)
    out_dtype = None
    if options.dtype != "keep":
        out_dtype = parse_dtype(options.dtype)
        set_config_dtype(config, out_dtype)

    notes = []
    routers = None
    if options.router_init == "calibrated":
        from surgery.upcycling.routers import calibrated_routers  # lazy: runs the model, imports torch

        routers, balance = calibrated_routers(source, family, options, moe_layers, hidden, spill_dir)
        notes.append(balance)
    recipes = UpcycleRecipes(source, family, options, hidden=hidden, expert_ffn=ffn // g, routers=routers, target=target)
    tensors = moe_tensors(target, config, source, family, recipes, dtype=out_dtype)
    down_dtype = out_dtype or source.info(dense_ffn_names(family, moe_layers[0])["down"]).dtype
    notes += _notes(options, target, down_dtype, recipes.down_factor)
    return Plan("upcycle", tensors, config, [source], side_files=source.side_files(),
                metadata=provenance([source], asdict(options)),
                notes=notes, rounding=folded_rounding([recipes.down_factor, recipes.shared_factor], down_dtype),
                dequantize=out_dtype is not None)  # --dtype widens a quantized source, as copy's does


class UpcycleRecipes:
    """ffn_recipe for moe_tensors: routers, experts, shared expert and dense FFN layers."""

    def __init__(self, source, family, options, *, hidden: int, expert_ffn: int, routers=None,
                 target=None):
        self.source, self.family, self.options = source, family, options
        self.hidden, self.expert_ffn, self.routers = hidden, expert_ffn, routers
        # Output scale of every routed expert: G to undo the shard split, 1/2 when a shared expert
        # carries the other half of the FFN. Put wholly on down_proj: the output is linear in it.
        self.down_factor = options.granularity * (SHARED_HALF if options.shared_expert else 1.0)
        # The shared expert carries the dense FFN's other half: the model adds target.shared_scale of its output
        # (a zero gate's sigmoid, or all of it without a gate), so its down_proj is scaled by half / that.
        self.shared_factor = SHARED_HALF / target.shared_scale if target is not None else 1.0
        self._dense_stats: dict[str, tuple[float, float]] = {}

    def __call__(self, expected: Expected) -> Recipe:
        if expected.group == "router":
            return self.router(expected)
        if expected.group == "experts":
            return self.expert(expected)
        if expected.group == "shared_expert":
            return self.shared_expert(expected)
        if expected.group == "ffn":  # a layer kept dense (--moe-layers)
            return Copy(self.source, self.family.spec("ffn", expected.role).name(expected.layer))
        raise AssertionError(f"upcycle has no recipe for {expected.group}/{expected.role} ({expected.name})")

    # ---------------------------------------------------------------- routers
    def router(self, expected: Expected) -> Recipe:
        options, layer = self.options, expected.layer
        if options.router_init == "calibrated":
            return Constant(self.routers[layer], f"k-means centroids of layer {layer} router inputs "
                                                 f"({options.copies} rows x{options.granularity})")
        init = router_registry.node(ROUTERS.method(options.router_init),
                            RouterRequest(options.copies, self.hidden, seed=router_seed(options.seed, layer),
                                          std=options.router_std))
        if options.granularity == 1:
            return init
        return Apply([init], RepeatRows(options.granularity), f"repeat each row x{options.granularity}")

    # ---------------------------------------------------------------- experts
    def expert(self, expected: Expected) -> Recipe:
        g, role = self.options.granularity, expected.role
        name = dense_ffn_names(self.family, expected.layer)[role]
        shard = expected.expert % g
        neurons = list(range(shard * self.expert_ffn, (shard + 1) * self.expert_ffn))
        if g == 1:
            recipe: Recipe = Copy(self.source, name)
        elif role == "down":
            recipe = Columns(self.source, name, neurons)
        else:
            recipe = Rows(self.source, name, neurons)
        factor = self.down_factor if role == "down" else 1.0
        if factor != 1.0:
            recipe = Scale(recipe, factor)
        if self.options.diverse:
            transform = self.diversity(expected, name, factor)
            recipe = Apply([recipe], transform, transform.describe())
        return recipe

    def diversity(self, expected: Expected, dense_name: str, factor: float) -> ExpertDiversity:
        options, layer, expert = self.options, expected.layer, expected.expert
        drop = noise = []
        if options.drop_upcycle > 0:
            drop = choose_neurons(self.expert_ffn, options.drop_upcycle,
                                  stream_seed(options.seed, layer, expert, "drop_neurons"))
        if options.noise > 0:
            noise = choose_neurons(self.expert_ffn, options.noise_share,
                                   stream_seed(options.seed, layer, expert, "noise_neurons"))
        stats = None if options.granularity == 1 else (lambda: self.scaled_stats(dense_name, factor))
        return ExpertDiversity(seeds={kind: stream_seed(options.seed, layer, expert, f"{kind}_{expected.role}")
                                      for kind in ("drop", "noise")},
                               axis=1 if expected.role == "down" else 0, drop=drop, noise=noise,
                               sigma=options.noise, stats=stats)

    def scaled_stats(self, dense_name: str, factor: float) -> tuple[float, float]:
        """(mean, std) of the dense matrix as it is scaled in every expert (read once per matrix)."""
        if dense_name not in self._dense_stats:
            self._dense_stats[dense_name] = matrix_stats(self.source.read(dense_name))
        mean, std = self._dense_stats[dense_name]
        return mean * factor, std * abs(factor)

    # ---------------------------------------------------------------- shared expert
    def shared_expert(self, expected: Expected) -> Recipe:
        if expected.role == "shared_gate" or not self.options.shared_expert:
            return inert_shared_expert(expected)
        recipe = Copy(self.source, dense_ffn_names(self.family, expected.layer)[expected.role])
        return Scale(recipe, self.shared_factor) if expected.role == "down" and self.shared_factor != 1.0 else recipe


@dataclass
class RepeatRows:
    """[R, H] -> [R * G, H]: row r becomes rows r*G ... r*G + G-1 (all shards of copy r share a logit)."""

    times: int

    def __call__(self, rows):
        return rows.repeat_interleave(self.times, dim=0)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _notes(options, target, down_dtype: str, down_factor: float) -> list[str]:
    notes = []
    if options.diverse:
        parts = []
        if options.drop_upcycle > 0:
            parts.append(f"--drop-upcycle re-initialises {options.drop_upcycle:.0%} of each expert's neurons")
        if options.noise > 0 and options.noise_share > 0:
            parts.append(f"--noise adds N(0, {options.noise:g}*std) to {options.noise_share:.0%} of each expert's neurons")
        notes.append("; ".join(parts) + ": exactness is broken on purpose, the result no longer reproduces the "
                     "source and needs training")
    if inert_shared_ffn(target) and not options.shared_expert:
        notes.append(inert_shared_note(target) + ". Use --shared-expert to make the dense FFN the shared expert")
    if options.dtype != "keep":
        notes.append(f"--dtype {options.dtype} rounds the weights: the result reproduces the source cast to "
                     f"{options.dtype}, not the source itself")
    if folded_rounding([down_factor], down_dtype):
        notes.append(f"down_proj of the experts is scaled by {down_factor:g}, not a power of two: in {down_dtype} "
                     "the scaled weights round (relative error up to 2^-9 for BF16, 2^-12 for F16), so the result "
                     "is exact only up to that rounding")
    return notes
