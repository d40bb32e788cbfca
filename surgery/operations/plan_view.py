"""The --dry-run view of a plan: a rich table of output tensors and their recipes."""

from __future__ import annotations

from surgery import console
from surgery.units import format_bytes, format_count
from surgery.writer.shards import assign_shards


def print_plan(plan, max_shard_size: int, limit_rows: int | None = None, sizes: dict | None = None) -> None:
    """The plan's tensors and recipes, then its totals; `sizes`: the output's active parameters
    (``checks.sizing.plan_sizes``), shown where the output is an MoE."""
    from rich.table import Table  # lazy: only a dry run prints a plan; every writing command imports this module

    table = Table(title=f"{plan.operation} plan", show_lines=False, header_style="bold")
    for column in ("output tensor", "shape", "dtype", "recipe"):
        table.add_column(column, overflow="fold")
    rows = plan.tensors if limit_rows is None else plan.tensors[:limit_rows]
    for tensor in rows:
        table.add_row(tensor.name, "×".join(map(str, tensor.shape)) or "scalar", tensor.dtype, tensor.recipe.describe())
    console.stdout.print(table)
    shards = assign_shards(plan.tensors, max_shard_size)
    active = (sizes or {}).get("active_parameters")
    active = (f" (active per token {format_count(active)}; without the input embedding "
              f"{format_count(sizes['active_parameters_without_embedding'])})" if active is not None
              and active != plan.parameters else "")
    console.stdout.print(f"{len(plan.tensors)} tensors, {format_count(plan.parameters)} parameters{active}, "
                         f"{format_bytes(plan.total_bytes)} in {len(shards)} shard(s); "
                         f"side files: {', '.join([p.name for p in plan.side_files] + sorted(plan.extra_files)) or 'none'}")
