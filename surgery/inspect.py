"""`surgery inspect`: a checkpoint's architecture, layout, parameter counts and problems.

Everything but ``--stats`` comes from headers and config.json; ``--stats`` streams every tensor
once (one tensor in memory at a time).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import click

from surgery import families as arch
from surgery import console
from surgery.checkpoint import Checkpoint
from surgery.errors import SurgeryError
from surgery.units import format_bytes, format_count

GROUP_ORDER = ("attention", "norm", "ffn", "router", "experts", "shared_expert", "embedding", "head", "other")


@dataclass
class Report:
    path: str
    architecture: str | None
    family: str | None
    kind: str | None
    expert_layout: str | None
    summary: dict
    dtypes: dict
    shards: list
    bytes_on_disk: int
    parameters: int
    active_parameters: int | None
    moe: dict | None
    layers: list
    problems: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    tensors: list | None = None
    stats: dict | None = None

    def to_json(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if value is not None or key not in ("tensors", "stats")}


def analyse(checkpoint: Checkpoint, with_tensors: bool = False, pattern: str | None = None,
            with_stats: bool = False) -> Report:
    config = checkpoint.config
    family = expected = dims = None
    layout = None
    problems: list[str] = []
    config_path = checkpoint.directory / "config.json"
    if config is not None:
        family = arch.detect_family(config, config_path)
        dims = arch.dimensions(family, config, config_path)
        layout = arch.detect_expert_layout(family, checkpoint.tensors) if family.kind == "moe" else None
        expected = arch.expected_tensors(family, config, layout or "per_expert", config_path)
        for name, entry in expected.items():
            info = checkpoint.tensors.get(name)
            if info is None:
                problems.append(f"missing tensor {name} (expected shape {list(entry.shape)})")
            elif tuple(info.shape) != entry.shape:
                problems.append(f"{info.file.name}: tensor {name} has shape {list(info.shape)}, config.json implies {list(entry.shape)}")
        for name in checkpoint.tensors:
            if name not in expected:
                problems.append(f"unexpected tensor {name} (not part of {family.architecture} for this config.json)")

    total = sum(info.numel for info in checkpoint.tensors.values())
    per_layer: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    globals_: dict[str, list] = defaultdict(lambda: [0, 0])
    layer_re = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    for name, info in checkpoint.tensors.items():
        entry = expected.get(name) if expected else None
        group = entry.group if entry else "other"
        layer = entry.layer if entry else (int(m.group(1)) if (m := layer_re.search(name)) else None)
        bucket = per_layer[layer][group] if layer is not None else globals_[group]
        bucket[0] += 1
        bucket[1] += info.numel
    layers = [{"layer": layer, "groups": {g: {"tensors": c[0], "parameters": c[1]} for g, c in sorted(
        groups.items(), key=lambda kv: GROUP_ORDER.index(kv[0]))}} for layer, groups in sorted(per_layer.items())]
    if globals_:
        layers.append({"layer": None, "groups": {g: {"tensors": c[0], "parameters": c[1]} for g, c in globals_.items()}})

    summary, moe, active = {}, None, None
    if config is not None:
        summary = {
            "layers": dims["layers"], "hidden_size": dims["hidden"], "intermediate_size": dims.get("ffn"),
            "attention_heads": dims["heads"], "kv_heads": dims["kv_heads"], "head_dim": dims["head_dim"],
            "vocab_size": dims["vocab"],
            "tie_word_embeddings": bool(arch.config_value(family, config, "tie_word_embeddings")),
        }
        if family.kind == "moe":
            moe_layers = [layer for layer in range(dims["layers"]) if arch.is_moe_layer(family, config, layer)]
            experts, top_k = dims.get("experts"), dims.get("top_k")
            moe = {"experts": experts, "top_k": top_k, "expert_intermediate_size": dims.get("expert_ffn"),
                   "shared_expert_intermediate_size": dims.get("shared_ffn") or None,
                   "moe_layers": moe_layers, "dense_layers": [l for l in range(dims["layers"]) if l not in moe_layers],
                   "norm_topk_prob": config.get("norm_topk_prob")}
            routed = sum(c[1] for l, groups in per_layer.items() for g, c in groups.items() if g == "experts")
            active = total - (round(routed * (1 - top_k / experts)) if experts and top_k else 0)
        else:
            active = total

    report = Report(
        path=str(checkpoint.path), architecture=family.architecture if family else None,
        family=family.name if family else None, kind=family.kind if family else None, expert_layout=layout,
        summary=summary,
        dtypes=dict(Counter(info.dtype for info in checkpoint.tensors.values())),
        shards=[{"file": shard.name, "bytes": shard.stat().st_size,
                 "tensors": sum(1 for i in checkpoint.tensors.values() if i.file == shard)} for shard in checkpoint.shards],
        bytes_on_disk=sum(shard.stat().st_size for shard in checkpoint.shards),
        parameters=total, active_parameters=active, moe=moe, layers=layers, problems=problems)
    if config is None:
        report.warnings.append("no config.json beside the checkpoint: architecture and shapes not checked")
    selected = [info for name, info in checkpoint.tensors.items() if not pattern or re.search(pattern, name)]
    if with_tensors or pattern:
        report.tensors = [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype, "shard": i.file.name,
                           "offset": i.offset, "bytes": i.nbytes} for i in selected]
    if with_stats:
        report.stats = tensor_stats(checkpoint, [info.name for info in selected])
        for name, stat in report.stats.items():
            if stat.get("nan") or stat.get("inf"):
                report.warnings.append(f"{checkpoint.info(name).file}: tensor {name!r} has {stat['nan']} NaN and "
                                       f"{stat['inf']} Inf values")
    return report


def tensor_stats(checkpoint: Checkpoint, names: list[str]) -> dict:
    """min/max/mean/std and NaN/Inf counts, one tensor in memory at a time."""
    import torch

    results = {}
    total = sum(checkpoint.tensors[n].nbytes for n in names)
    with console.progress("stats", total) as advance:
        for name in names:
            info = checkpoint.tensors[name]
            if info.dtype.startswith(("F8", "U", "I", "BOOL")) and info.dtype not in ("F32", "F16", "BF16", "F64"):
                results[name] = {"dtype": info.dtype, "skipped": "not a float16/32/64 tensor"}
            else:
                value = checkpoint.read(name).to(torch.float64 if info.dtype == "F64" else torch.float32)
                finite = torch.isfinite(value)
                good = value[finite]
                results[name] = {
                    "min": good.min().item() if good.numel() else None, "max": good.max().item() if good.numel() else None,
                    "mean": good.mean().item() if good.numel() else None,
                    "std": good.std().item() if good.numel() > 1 else None,
                    "nan": int(torch.isnan(value).sum()), "inf": int(torch.isinf(value).sum()),
                }
            advance(info.nbytes, name)
    return results


def print_report(report: Report, show_layers: bool = True) -> None:
    from surgery.validate_view import compact_table

    out = console.stdout
    title = report.architecture or "unknown architecture"
    out.print(f"[bold]{report.path}[/]: {title}" + (f" ({report.kind}, experts {report.expert_layout})" if report.expert_layout else f" ({report.kind})" if report.kind else ""))
    rows = [(key.replace("_", " "), str(value)) for key, value in report.summary.items() if value is not None]
    if report.moe:
        moe = report.moe
        rows += [("experts", f"{moe['experts']} (top-{moe['top_k']}), expert intermediate size {moe['expert_intermediate_size']}")]
        if moe.get("shared_expert_intermediate_size"):
            rows.append(("shared expert", f"intermediate size {moe['shared_expert_intermediate_size']}"))
        rows.append(("MoE layers", _ranges(moe["moe_layers"]) + (f"; dense: {_ranges(moe['dense_layers'])}" if moe["dense_layers"] else "")))
    rows += [
        ("dtypes", ", ".join(f"{d} × {n}" for d, n in report.dtypes.items())),
        ("shards", f"{len(report.shards)} ({format_bytes(report.bytes_on_disk)} on disk)"),
        ("parameters", f"{format_count(report.parameters)} ({report.parameters:,})"),
    ]
    if report.active_parameters is not None and report.active_parameters != report.parameters:
        rows.append(("active per token", f"{format_count(report.active_parameters)} ({report.active_parameters:,})"))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:  # lines, not a table: a long value wraps as text, never inside a cell
        out.print(f"  [cyan]{key:<{width}}[/]  {value}")
    if show_layers and report.layers:
        groups = [g for g in GROUP_ORDER if any(g in layer["groups"] for layer in report.layers)]
        out.print("tensors per layer (count / parameters); identical consecutive layers on one row")
        layer_table = compact_table()
        layer_table.add_column("layers", no_wrap=True)
        for group in groups:
            layer_table.add_column(group.replace("_", " "), justify="right", no_wrap=True)
        for label, cells in _layer_rows(report.layers, groups):
            layer_table.add_row(label, *cells)
        out.print(layer_table)
    if report.tensors is not None:
        wide = out.width >= 120
        out.print(f"tensors ({len(report.tensors)})" + ("" if wide else "; shard and offset: --json or a terminal of "
                                                              "120 columns"))
        tensor_table = compact_table()
        columns = ("name", "shape", "dtype", "shard", "offset", "bytes") if wide else ("name", "shape", "dtype", "bytes")
        for column in columns:
            tensor_table.add_column(column, justify="right" if column in ("offset", "bytes") else "left",
                                    overflow="fold" if column == "name" else None, no_wrap=column != "name")
        for t in report.tensors:
            cells = {"name": t["name"], "shape": "×".join(map(str, t["shape"])) or "scalar", "dtype": t["dtype"],
                     "shard": t["shard"], "offset": str(t["offset"]), "bytes": str(t["bytes"])}
            tensor_table.add_row(*(cells[column] for column in columns))
        out.print(tensor_table)
    if report.stats is not None:
        out.print("statistics")
        stats_table = compact_table()
        for column in ("name", "min", "max", "mean", "std", "NaN", "Inf"):
            stats_table.add_column(column, justify="left" if column == "name" else "right")
        for name, s in report.stats.items():
            if "skipped" in s:
                stats_table.add_row(name, "", "", "", "", "", "", end_section=False)
                continue
            fmt = lambda v: "" if v is None else f"{v:.4g}"
            stats_table.add_row(name, fmt(s["min"]), fmt(s["max"]), fmt(s["mean"]), fmt(s["std"]),
                                str(s["nan"]), str(s["inf"]))
        out.print(stats_table)
    for warning in report.warnings:
        console.warn(warning)
    if report.problems:
        out.print(f"[bold red]problems ({len(report.problems)}):[/]")
        for problem in report.problems:
            out.print(f"  - {problem}")
    else:
        out.print("[green]no problems found[/]" + ("" if report.architecture else " (structure not checked without config.json)"))


def _layer_rows(layers: list, groups: list) -> list[tuple[str, list[str]]]:
    """(layers label, cells) with consecutive layers of identical cells merged ("0-31"), globals last."""
    rows: list[tuple[list[int], list[str]]] = []
    globals_ = None
    for layer in layers:
        cells = [f"{layer['groups'][g]['tensors']} / {format_count(layer['groups'][g]['parameters'])}"
                 if g in layer["groups"] else "" for g in groups]
        if layer["layer"] is None:
            globals_ = cells
        elif rows and rows[-1][1] == cells and rows[-1][0][-1] == layer["layer"] - 1:
            rows[-1][0].append(layer["layer"])
        else:
            rows.append(([layer["layer"]], cells))
    out = [(_ranges(numbers), cells) for numbers, cells in rows]
    return out + ([("global", globals_)] if globals_ is not None else [])


def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    parts, start = [], values[0]
    for previous, current in zip(values, values[1:] + [None]):
        if current != previous + 1 if current is not None else True:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ", ".join(parts)


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--tensors", "with_tensors", is_flag=True, help="List every tensor with shape, dtype, shard and byte offset.")
@click.option("--filter", "pattern", metavar="REGEX", help="Only tensors whose name matches REGEX (implies --tensors).")
@click.option("--stats", "with_stats", is_flag=True, help="Stream every tensor once: min/max/mean/std, NaN/Inf counts.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--strict", is_flag=True, help="Exit with 2 when problems are found.")
def command(path, with_tensors, pattern, with_stats, as_json, strict):
    """Show PATH's architecture, tensor layout, parameter counts and problems."""
    import json

    if pattern:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SurgeryError(f"--filter {pattern!r} is not a valid regular expression: {exc}") from None
    with Checkpoint.open(path) as checkpoint:
        report = analyse(checkpoint, with_tensors, pattern, with_stats)
    if as_json:
        console.stdout.print_json(json.dumps(report.to_json()))
        for warning in report.warnings:
            console.warn(warning)
    else:
        print_report(report)
    if strict and report.problems:
        raise SurgeryError(f"{path}: {len(report.problems)} problem(s) found, first: {report.problems[0]}")


# `surgery.inspect(...)`: this module is also the API function (surgery.api.inspect)
from surgery.api import callable_module  # noqa: E402

callable_module(__name__)
