"""Options shared by every command that writes a checkpoint, and the code that runs its plan."""

from __future__ import annotations

import json
from pathlib import Path

import click

from surgery import console
from surgery.errors import SurgeryError


def _remember(ctx, param, value):
    ctx.meta[f"surgery.{param.name}"] = value
    return value


def output_options(func):
    """--max-shard-size, --force, --dry-run, --json (and --allow-nonfinite) on every writing command."""
    func = click.option("--allow-nonfinite", is_flag=True, expose_value=False, callback=_remember,
                        help="Write tensors that contain NaN/Inf instead of refusing.")(func)
    func = click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as JSON.")(func)
    func = click.option("--dry-run", is_flag=True, help="Print the plan (every output tensor and its recipe); write nothing.")(func)
    func = click.option("--force", is_flag=True, help="Replace OUT if it exists.")(func)
    func = click.option("--max-shard-size", default="5GB", show_default=True,
                        help="Largest shard, in bytes: 500MB, 5GB, 2GiB ...")(func)
    return func


def verify_options(func):
    """--verify and --verify-tokens, on every command that writes a model."""
    func = click.option("--verify-tokens", default=2048, show_default=True, type=click.IntRange(2),
                        help="Tokens of the validation sample --verify runs (the shipped sample text, or pseudo-random "
                             "ids when the model has no tokenizer).")(func)
    func = click.option("--verify", is_flag=True,
                        help="After writing, check the output against its source(s): an exact result layer by layer "
                             "(exit 2 naming the first layer that differs), any other by its loss change.")(func)
    return func


def execute(plan, out: Path, *, max_shard_size: str, force: bool, dry_run: bool, as_json: bool, fill=None) -> bool:
    """Print the plan (dry run) or write it (`fill`: see ``write_plan``). Returns True when something was written."""
    from surgery.units import format_bytes, parse_size

    limit = parse_size(max_shard_size)
    for message in plan.notes:
        console.note(message)
    if dry_run:
        if as_json:
            console.stdout.print_json(json.dumps(plan.to_json()))
        else:
            from surgery.plan_view import print_plan

            print_plan(plan, limit)
        return False
    if as_json:
        raise SurgeryError("--json applies to --dry-run only")
    import time

    from surgery.writer import write_plan

    started = time.perf_counter()
    filling = [0.0]

    def timed_fill(draft):
        begun = time.perf_counter()
        try:
            return fill(draft)
        finally:
            filling[0] = time.perf_counter() - begun

    context = click.get_current_context(silent=True)
    allow_nonfinite = bool(context and context.meta.get("surgery.allow_nonfinite"))
    shards = write_plan(plan, Path(out), limit, force=force, allow_nonfinite=allow_nonfinite,
                        fill=timed_fill if fill else None)
    seconds = time.perf_counter() - started - filling[0]
    console.info(f"wrote {out}: {len(plan.tensors)} tensors, {format_bytes(plan.total_bytes)} in {len(shards)} "
                 f"shard{'s' if len(shards) != 1 else ''} ({seconds:.1f} s, "
                 f"{plan.total_bytes / max(seconds, 1e-9) / 1e6:.0f} MB/s"
                 + (f"; {filling[0]:.1f} s running the draft" if fill else "") + ")")
    return True
