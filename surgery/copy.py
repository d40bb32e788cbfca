"""`surgery copy`: the identity plan (``surgery.plan.identity``). Re-shards or casts a checkpoint, converts its
expert layout, and changes an MoE's ``--top-k`` / ``--norm-topk-prob`` in its config with a note of what the forward
pass now does."""

from __future__ import annotations

from dataclasses import dataclass

import click

from surgery.checks import sizing
from surgery.io.checkpoint import Checkpoint
from surgery.operations.options import dtype_option
from surgery.operations.output import OutputOptions, output_options, write
from surgery.plan.identity import build_plan


@dataclass(frozen=True)
class CopyOptions:
    dtype: str = "keep"  # output dtype of floating-point tensors (keep: the inputs')
    top_k: int | None = None  # MoE: experts per token (the config only; weights unchanged)
    norm_topk_prob: bool | None = None  # MoE formats with the switch: renormalise the top-k weights, or not


@click.command("copy")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@dtype_option
@click.option("--top-k", "-k", type=int, default=None,
              help="MoE: experts per token (the config only; weights unchanged).")
@click.option("--norm-topk-prob", type=click.Choice(["true", "false"]), default=None,
              help="MoE formats with the switch: renormalise the top-k weights to sum to 1, or not.")
@output_options(verify=False, layout="keep")
def command(src, out, dtype, top_k, norm_topk_prob, output):
    """Copy SRC to OUT through the streaming writer (re-shard, cast, convert the expert layout, change top-k)."""
    norm = None if norm_topk_prob is None else norm_topk_prob == "true"
    run(src, out, CopyOptions(dtype, top_k, norm), output)


def run(src, out, options: CopyOptions = CopyOptions(), output: OutputOptions = OutputOptions(layout="keep")):
    """Copy SRC to OUT through the streaming writer (re-shard with max_shard_size, cast with dtype, convert the
    expert layout with layout="per-expert" or "fused", change an MoE's top_k / norm_topk_prob in its config).
    Returns a ``Result``."""
    output.check()
    with sizing.config_only(output.dry_run, needs=f"writing {out}"), Checkpoint.open(src) as source:
        return write(build_plan(source, options.dtype, options.top_k, options.norm_topk_prob), out, output)
