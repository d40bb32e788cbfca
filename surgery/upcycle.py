"""`surgery upcycle`: dense -> MoE by copying each FFN into N experts (Sparse Upcycling).

Every expert starts as the dense FFN (or, with ``--granularity G``, as one of G neuron shards of
it), a router is added, every other tensor is copied. The weights are chosen so that the MoE
model computes exactly what the dense model computed, for any router and any top-k (the maths
is in docs/upcycle.md):

- plain: renormalised top-k weights sum to 1 and all experts are equal, so sum_i w_i FFN(x) = FFN(x);
- granular: expert e is shard e % G of copy e // G; router rows are drawn per copy and repeated
  G times, so top-k (k a multiple of G) selects whole copies, and down_proj is scaled by G;
- Qwen2-MoE shared expert: the shared expert is the dense FFN and its gate is zero, so it adds
  sigmoid(0) FFN(x) = FFN(x) / 2; routed experts have down_proj scaled by 1/2 and add the other half;
- Qwen2-MoE without --shared-expert: an inert all-zero shared expert (the format always has one).

The plan is built from headers (plus, for ``--router-init calibrated``, a forward pass of the
source on calibration text) and written by the streaming writer one tensor at a time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from surgery import families as arch
from surgery.families import Expected
from surgery.errors import SurgeryError
from surgery.moe_plan import (check_expert_counts, dense_ffn_names, folded_rounding, inert_shared_expert, inert_shared_ffn,
                               inert_shared_note, moe_tensors, open_dense_source, parse_moe_layers, provenance)
from surgery.execution.session import RunsModel, run_options
from surgery.operations.output import (OUTPUT_DTYPES, OutputOptions, PostWriteCheck, check_choice, dtype_option,
                                      output_options, write)
from surgery.plan import Plan
from surgery.recipes import Apply, Columns, Constant, Copy, Init, Recipe, Rows, Scale
from surgery.seeds import router_seed

FORMATS = ("auto", *arch.moe_formats())
ROUTER_INITS = ("normal", "uniform", "zero", "calibrated")
# Qwen2-MoE always builds a shared expert; without --shared-expert it is written all-zero (it adds
# exactly 0). 8 neurons rather than 1 so that tensor-parallel engines can split it 2, 4 or 8 ways.
SHARED_HALF = 0.5  # with --shared-expert, the routed experts and the shared expert each add half the dense FFN
CALIBRATION_TOKENS = 2048


@dataclass(frozen=True)
class UpcycleOptions(RunsModel):
    num_experts: int
    top_k: int
    format: str = "auto"
    router_init: str = "normal"
    router_std: float = 0.02
    seed: int = 0
    granularity: int = 1
    shared_expert: bool = False
    moe_layers: str = "all"
    noise: float = 0.0
    noise_fraction: float | None = None
    drop_upcycle: float = 0.0
    calibration: str | None = None
    calibration_tokens: int = CALIBRATION_TOKENS
    dtype: str = "keep"
    device: str = "auto"
    memory_budget: str | None = None
    compute_dtype: str = "auto"

    @property
    def copies(self) -> int:
        """R: distinct router rows (copies of the FFN); each is split into `granularity` experts."""
        return self.num_experts // self.granularity

    @property
    def noise_share(self) -> float:
        return 1.0 if self.noise_fraction is None else self.noise_fraction

    @property
    def diverse(self) -> bool:
        """True when noise or Drop-Upcycling will change some expert weights (exactness broken)."""
        return (self.noise > 0 and self.noise_share > 0) or self.drop_upcycle > 0


def check_options(options: UpcycleOptions) -> None:
    """Refuse option values that cannot work, whatever the source (one-line SurgeryError)."""
    n, k, g = options.num_experts, options.top_k, options.granularity
    check_choice("--format", options.format, FORMATS)
    check_choice("--router-init", options.router_init, ROUTER_INITS)
    check_choice("--dtype", options.dtype, OUTPUT_DTYPES)
    check_expert_counts(n, k)
    if g < 1:
        raise SurgeryError(f"--granularity {g}: must be a positive integer")
    if n % g:
        raise SurgeryError(f"--num-experts {n} is not a multiple of --granularity {g} (experts = copies x granularity)")
    if k % g:
        nearest = " or ".join(str(x) for x in (k - k % g, k - k % g + g) if 0 < x <= n)
        raise SurgeryError(f"--top-k {k} is not a multiple of --granularity {g}: top-k must select whole copies "
                           f"(all {g} shards of one) to be exact; use --top-k {nearest}")
    if options.router_init == "zero" and g > 1 and k < n:
        raise SurgeryError(f"--router-init zero with --granularity {g} and --top-k {k} < --num-experts {n}: a zero "
                           "router ties every expert, so top-k may pick shards of different copies and the result "
                           "cannot be exact; use normal, uniform or calibrated (or --top-k equal to --num-experts)")
    if options.seed < 0:
        raise SurgeryError(f"--seed {options.seed}: must be a non-negative integer")
    if not options.router_std > 0 or not math.isfinite(options.router_std):
        raise SurgeryError(f"--router-std {options.router_std}: must be a positive number")
    if not options.noise >= 0 or not math.isfinite(options.noise):
        raise SurgeryError(f"--noise {options.noise}: must be a non-negative number (a multiple of each matrix's std)")
    if options.noise_fraction is not None and options.noise == 0:
        raise SurgeryError("--noise-fraction needs --noise SIGMA")
    for flag, value in (("--noise-fraction", options.noise_share), ("--drop-upcycle", options.drop_upcycle)):
        if not 0 <= value <= 1:
            raise SurgeryError(f"{flag} {value}: must be a fraction of each expert's neurons in [0, 1]")
    if options.calibration is not None and options.router_init != "calibrated":
        raise SurgeryError("--calibration applies to --router-init calibrated only")
    options.run.check()


def build_plan(src, num_experts: int, top_k: int, spill_dir=None, **kwargs) -> Plan:
    """The upcycle plan of the dense checkpoint `src`; kwargs are the fields of UpcycleOptions. `spill_dir`:
    where calibration may spill hidden states (beside the output)."""
    return plan_from_options(src, UpcycleOptions(num_experts, top_k, **kwargs), spill_dir)


def plan_from_options(src, options: UpcycleOptions, spill_dir=None) -> Plan:
    check_options(options)
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
        from surgery.checkpoint import parse_dtype

        from surgery.checkpoint import set_config_dtype

        out_dtype = parse_dtype(options.dtype)
        set_config_dtype(config, out_dtype)

    notes = []
    routers = None
    if options.router_init == "calibrated":
        from surgery.upcycle_router import calibrated_routers

        routers, balance = calibrated_routers(source, family, options, moe_layers, hidden, spill_dir)
        notes.append(balance)
    recipes = UpcycleRecipes(source, family, options, hidden=hidden, expert_ffn=ffn // g, routers=routers, target=target)
    tensors = moe_tensors(target, config, source, family, recipes, dtype=out_dtype)
    down_dtype = out_dtype or source.info(dense_ffn_names(family, moe_layers[0])["down"]).dtype
    notes += _notes(options, target, down_dtype, recipes.down_factor)
    return Plan("upcycle", tensors, config, [source], side_files=source.side_files(),
                metadata=provenance([source], asdict(options)),
                notes=notes, rounding=folded_rounding([recipes.down_factor, recipes.shared_factor], down_dtype))


class UpcycleRecipes:
    """ffn_recipe for moe_tensors: routers, experts, shared expert and dense FFN layers."""

    def __init__(self, source, family, options: UpcycleOptions, *, hidden: int, expert_ffn: int, routers=None,
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
        init = Init(options.router_init, (options.copies, self.hidden), seed=router_seed(options.seed, layer),
                    std=options.router_std)
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

    def diversity(self, expected: Expected, dense_name: str, factor: float) -> "ExpertDiversity":
        from surgery import diversity

        options, layer, expert = self.options, expected.layer, expected.expert
        drop = noise = []
        if options.drop_upcycle > 0:
            drop = diversity.choose_neurons(self.expert_ffn, options.drop_upcycle,
                                            diversity.stream_seed(options.seed, layer, expert, "drop_neurons"))
        if options.noise > 0:
            noise = diversity.choose_neurons(self.expert_ffn, options.noise_share,
                                             diversity.stream_seed(options.seed, layer, expert, "noise_neurons"))
        stats = None if options.granularity == 1 else (lambda: self.scaled_stats(dense_name, factor))
        return ExpertDiversity(seeds={kind: diversity.stream_seed(options.seed, layer, expert, f"{kind}_{expected.role}")
                                      for kind in ("drop", "noise")},
                               axis=1 if expected.role == "down" else 0, drop=drop, noise=noise,
                               sigma=options.noise, stats=stats)

    def scaled_stats(self, dense_name: str, factor: float) -> tuple[float, float]:
        """(mean, std) of the dense matrix as it is scaled in every expert (read once per matrix)."""
        from surgery.diversity import matrix_stats

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


@dataclass
class ExpertDiversity:
    """Drop-Upcycling then noise on one expert matrix; neuron i is row i (gate, up) or column i (down)."""

    seeds: dict
    axis: int
    drop: list
    noise: list
    sigma: float
    stats: object = None  # () -> (mean, std) of the original matrix; None: those of the input itself

    def describe(self) -> str:
        parts = []
        if self.drop:
            parts.append(f"drop-upcycle {len(self.drop)} neurons")
        if self.noise and self.sigma > 0:
            parts.append(f"noise {self.sigma:g}*std on {len(self.noise)} neurons")
        return " + ".join(parts) or "unchanged"

    def __call__(self, weight):
        from surgery import diversity

        mean, std = self.stats() if self.stats else diversity.matrix_stats(weight)
        if self.drop:
            weight = diversity.drop_reinit(weight, self.drop, self.axis, mean, std, self.seeds["drop"])
        if self.noise and self.sigma > 0:
            weight = diversity.add_noise(weight, self.noise, self.axis, self.sigma * std, self.seeds["noise"])
        return weight


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _notes(options: UpcycleOptions, target, down_dtype: str, down_factor: float) -> list[str]:
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


# ------------------------------------------------------------------------- command line
@click.command("upcycle")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--num-experts", "-n", type=int, required=True, help="Experts per MoE layer (N).")
@click.option("--top-k", "-k", type=int, required=True, help="Experts each token uses (K <= N).")
@click.option("--format", "fmt", default="auto", show_default=True, type=click.Choice(FORMATS),
              help=f"Target format; auto: {arch.auto_formats()}.")
@click.option("--router-init", default="normal", show_default=True, type=click.Choice(ROUTER_INITS),
              help="Router rows: normal(0, std), uniform(+-1/sqrt(hidden)), zero, or k-means centroids of the "
                   "router inputs on calibration text.")
@click.option("--router-std", default=0.02, show_default=True, type=float,
              help="Std of normal router rows; calibrated rows get the same norm.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of every random choice.")
@click.option("--granularity", "-g", default=1, show_default=True, type=int,
              help="Fine-grained experts: each holds 1/G of the FFN's neurons (N and K multiples of G).")
@click.option("--shared-expert", is_flag=True, help="qwen2_moe: the dense FFN becomes the always-on shared expert.")
@click.option("--moe-layers", default="all", show_default=True,
              help="Layers that become MoE: all, every-other or a list such as 0,2,5-7 (qwen formats keep the "
                   "others dense).")
@click.option("--noise", default=0.0, type=float,
              help="Add N(0, SIGMA*std(W)) to each expert's chosen neurons (breaks exactness on purpose).")
@click.option("--noise-fraction", default=None, type=float, help="Fraction of each expert's neurons --noise touches (default 1).")
@click.option("--drop-upcycle", default=0.0, type=float,
              help="Re-initialise this fraction of each expert's neurons from N(mean, std) of the original "
                   "matrix (Drop-Upcycling; breaks exactness on purpose).")
@click.option("--calibration", default=None, type=click.Path(path_type=str),
              help="Calibration text (or token ids .npy/.pt/.jsonl) for --router-init calibrated "
                   "[default: the shipped sample text].")
@click.option("--calibration-tokens", default=CALIBRATION_TOKENS, show_default=True, type=int,
              help="Calibration tokens used at most.")
@dtype_option
@run_options
@output_options
def command(src, out, num_experts, top_k, fmt, router_init, router_std, seed, granularity, shared_expert,
            moe_layers, noise, noise_fraction, drop_upcycle, calibration, calibration_tokens, dtype, device,
            memory_budget, compute_dtype, output):
    """Upcycle the dense checkpoint SRC into an MoE checkpoint OUT whose experts start as copies of each FFN."""
    options = UpcycleOptions(num_experts, top_k, format=fmt, router_init=router_init, router_std=router_std,
                             seed=seed, granularity=granularity, shared_expert=shared_expert, moe_layers=moe_layers,
                             noise=noise, noise_fraction=noise_fraction, drop_upcycle=drop_upcycle,
                             calibration=calibration, calibration_tokens=calibration_tokens, dtype=dtype,
                             device=device, memory_budget=memory_budget, compute_dtype=compute_dtype)
    run(src, out, options, output)


def run(src, out, options: UpcycleOptions, output: OutputOptions = OutputOptions()):
    """Upcycle SRC into OUT (the command and ``surgery.upcycle`` both land here); returns a ``Result``."""
    output.check()
    plan = plan_from_options(src, options, spill_dir=Path(out).resolve().parent)
    try:
        return write(plan, out, output, check=PostWriteCheck([src], exact=not options.diverse, settings=options.run))
    finally:
        for source in plan.sources:
            source.close()


# `surgery.upcycle(...)`: this module is also the API function (surgery.api.upcycle)
from surgery.api import callable_module  # noqa: E402

callable_module(__name__, ["src", "out", "num_experts", "top_k"], UpcycleOptions)
