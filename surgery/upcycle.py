"""`surgery upcycle`: dense -> MoE by copying each FFN into N experts (Sparse Upcycling).

Exact for any router and top-k (the maths is in docs/upcycle.md); ``--granularity``, ``--shared-expert``,
``--noise`` and ``--drop-upcycle`` vary it. The plan is ``surgery.upcycling.plan``'s; calibrated routers are
fitted by ``surgery.upcycling.routers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import click

from surgery import families as arch
from surgery.checks import sizing
from surgery.errors import SurgeryError, check_choice
from surgery.execution.settings import RunOptions
from surgery.operations.options import FORMATS, OUTPUT_DTYPES, calibration_options, dtype_option, run_options
from surgery.operations.output import OutputOptions, PostWriteCheck, output_options, write
from surgery.plan.moe import check_expert_counts
from surgery.plan.plan import Plan
from surgery.upcycling import plan as upcycle_plan
from surgery.upcycling.plan import ROUTERS


@dataclass(frozen=True)
class UpcycleOptions(RunOptions):
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
    calibration_tokens: int = 2048
    dtype: str = "keep"

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

    def check(self) -> None:
        """Refuse option values that cannot work, whatever the source (one-line SurgeryError)."""
        n, k, g = self.num_experts, self.top_k, self.granularity
        check_choice("--format", self.format, FORMATS)
        check_choice("--router-init", self.router_init, ROUTERS.names)
        check_choice("--dtype", self.dtype, OUTPUT_DTYPES)
        check_expert_counts(n, k)
        if g < 1:
            raise SurgeryError(f"--granularity {g}: must be a positive integer")
        if n % g:
            raise SurgeryError(f"--num-experts {n} is not a multiple of --granularity {g} (experts = copies x granularity)")
        if k % g:
            nearest = " or ".join(str(x) for x in (k - k % g, k - k % g + g) if 0 < x <= n)
            raise SurgeryError(f"--top-k {k} is not a multiple of --granularity {g}: top-k must select whole copies "
                               f"(all {g} shards of one) to be exact; use --top-k {nearest}")
        if self.router_init == "zero" and g > 1 and k < n:
            raise SurgeryError(f"--router-init zero with --granularity {g} and --top-k {k} < --num-experts {n}: a zero "
                               "router ties every expert, so top-k may pick shards of different copies and the result "
                               "cannot be exact; use normal, uniform or calibrated (or --top-k equal to --num-experts)")
        if self.seed < 0:
            raise SurgeryError(f"--seed {self.seed}: must be a non-negative integer")
        if not self.router_std > 0 or not math.isfinite(self.router_std):
            raise SurgeryError(f"--router-std {self.router_std}: must be a positive number")
        if not self.noise >= 0 or not math.isfinite(self.noise):
            raise SurgeryError(f"--noise {self.noise}: must be a non-negative number (a multiple of each matrix's std)")
        if self.noise_fraction is not None and self.noise == 0:
            raise SurgeryError("--noise-fraction needs --noise SIGMA")
        for flag, value in (("--noise-fraction", self.noise_share), ("--drop-upcycle", self.drop_upcycle)):
            if not 0 <= value <= 1:
                raise SurgeryError(f"{flag} {value}: must be a fraction of each expert's neurons in [0, 1]")
        if self.calibration is not None and self.router_init != "calibrated":
            raise SurgeryError("--calibration applies to --router-init calibrated only")
        self.run.check()


@click.command("upcycle")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--num-experts", "-n", type=int, required=True, help="Experts per MoE layer (N).")
@click.option("--top-k", "-k", type=int, required=True, help="Experts each token uses (K <= N).")
@click.option("--format", default="auto", show_default=True, type=click.Choice(FORMATS),
              help=f"Target format; auto: {arch.auto_formats()}.")
@click.option("--router-init", default="normal", show_default=True, type=click.Choice(ROUTERS.names),
              help="Router rows: " + ROUTERS.help)
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
@calibration_options(UpcycleOptions, calibration="Calibration text (or token ids .npy/.pt/.jsonl) for --router-init "
                                                 "calibrated [default: the shipped sample text].")
@dtype_option
@run_options
@output_options
def command(src, out, output, **options):
    """Upcycle the dense checkpoint SRC into an MoE checkpoint OUT whose experts start as copies of each FFN."""
    run(src, out, UpcycleOptions(**options), output)


def run(src, out, options: UpcycleOptions, output: OutputOptions = OutputOptions()):
    """Upcycle SRC into OUT (the command and ``surgery.upcycle`` both land here); returns a ``Result``."""
    output.check()
    options.check()
    calibrated = options.router_init == "calibrated"
    with sizing.config_only(output.dry_run and not calibrated,
                            needs="--router-init calibrated" if output.dry_run else f"writing {out}"):
        plan = upcycle_plan.build_plan(src, options, spill_dir=Path(out).resolve().parent)
    try:
        return write(plan, out, output, check=PostWriteCheck([src], exact=not options.diverse, settings=options.run))
    finally:
        for source in plan.sources:
            source.close()


def build_plan(src, num_experts: int, top_k: int, spill_dir=None, **options) -> Plan:
    """The upcycle plan of the dense checkpoint `src`; `options` are the fields of UpcycleOptions (checked)."""
    settings = UpcycleOptions(num_experts, top_k, **options)
    settings.check()
    return upcycle_plan.build_plan(src, settings, spill_dir)
