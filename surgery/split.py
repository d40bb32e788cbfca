"""`surgery split`: divide each dense FFN's neurons among N smaller experts (LLaMA-MoE, MoEfication).

The strategies are ``surgery.partition``'s; the plan (exact at K = N with a zero router, the expert scale,
shared neurons, padding) is ``surgery.partition.plan``'s; data-driven partitions and calibrated routers run the
model layer by layer (``surgery.partition.calibrated``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import click

from surgery import families as arch
from surgery.execution.settings import RunOptions
from surgery.operations.options import FORMATS, calibration_options, dtype_option, run_options
from surgery.operations.output import OutputOptions, PostWriteCheck, output_options, write
from surgery.partition import STRATEGIES
from surgery.partition.plan import AUTO_SCALE, ROUTERS, build_plan, resolve_expert_scale, resolve_router_init
from surgery.plan.sources import open_dense_source
from surgery.writer.stream import check_output_path


@dataclass(frozen=True)
class SplitOptions(RunOptions):
    num_experts: int
    top_k: int
    strategy: str | None = None
    format: str = "auto"
    shared_neurons: int | None = None
    shared_fraction: float | None = None
    cluster_on: str = "up"
    calibration: str | None = None  # None: the shipped sample text (io.data_files.SAMPLE_TEXT)
    calibration_tokens: int = 8192
    router_init: str = "auto"
    expert_scale: str = "auto"
    seed: int = 0
    moe_layers: str = "all"
    partition: str | None = None
    save_partition: str | None = None
    dtype: str = "keep"

    def record(self) -> dict:
        """The options as written into the output's metadata (paths as given)."""
        return {key: value for key, value in asdict(self).items() if key != "save_partition"}


@click.command("split")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--num-experts", "-n", type=int, required=True, help="Experts per MoE layer (N >= 2).")
@click.option("--top-k", "-k", type=int, required=True, help="Experts each token uses (1..N; K = N is exact).")
@click.option("--strategy", default=None, help=f"How neurons are divided: {', '.join(STRATEGIES)}.")
@click.option("--format", default="auto", show_default=True,
              help=f"Output format: auto ({arch.auto_formats()}), {', '.join(FORMATS[1:])}.")
@click.option("--shared-neurons", type=int, default=None, help="Neurons shared by every token (default: 0; "
              "sharing-inter and shared-norm: the size of one expert).")
@click.option("--shared-fraction", type=float, default=None, help="Shared neurons as a fraction of the FFN.")
@click.option("--cluster-on", default="up", show_default=True, help="clustering: rows of up, gate or gate+up.")
@calibration_options(SplitOptions, calibration="Calibration text (or token ids .jsonl/.npy/.pt) for sharing-*, "
                                               "coactivation and --router-init calibrated (default: the shipped sample "
                                               "text).")
@click.option("--router-init", default="auto", show_default=True, help="Router rows: " + ROUTERS.help)
@click.option("--expert-scale", default="auto", show_default=True,
              help=f"Factor folded into each expert's down_proj: auto (= {AUTO_SCALE}), K, N/K, N or a number.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--moe-layers", default="all", show_default=True, help="all, every-other or a list like 0,2,5-7 "
              "(qwen formats only; other layers stay dense).")
@click.option("--save-partition", default=None, help="Write the neuron assignment to FILE (.json or .npz).")
@click.option("--partition", default=None, help="Reuse a neuron assignment saved with --save-partition.")
@dtype_option
@run_options
@output_options
def command(src, out, output, **options):
    """Split each FFN of the dense model SRC into N experts and write the MoE to OUT."""
    run(src, out, SplitOptions(**options), output)


def run(src, out, options: SplitOptions, output: OutputOptions = OutputOptions()):
    """Split SRC into OUT (the command and ``surgery.split`` both land here); returns a ``Result``."""
    output.check()
    source, family = open_dense_source(src)
    with source:
        if not output.dry_run:
            check_output_path(Path(out), [source], output.force)  # before the (possibly long) partitioning
        plan = build_plan(source, family, options, spill_dir=Path(out).resolve().parent)
        router = resolve_router_init(options, source)[0].router_init  # what `auto` became
        exact = options.top_k == options.num_experts and router == "zero" and \
            resolve_expert_scale(options.expert_scale, options.num_experts, options.top_k) == options.num_experts
        return write(plan, Path(out), output, check=PostWriteCheck([src], exact=exact, settings=options.run))
