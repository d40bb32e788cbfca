"""What `surgery inspect` prints: the report as lines and compact tables that fit 80 columns."""

from __future__ import annotations

from surgery import console
from surgery.checks.inspection import GROUP_ORDER, Report
from surgery.checks.report_view import compact_table
from surgery.units import format_bytes, format_count


def print_report(report: Report, show_layers: bool = True) -> None:
    out = console.stdout
    title = report.architecture or "unknown architecture"
    out.print(f"[bold]{report.path}[/]: {title}" + (f" ({report.kind}, experts {report.expert_layout})" if report.expert_layout else f" ({report.kind})" if report.kind else ""))
    if report.config_only:
        out.print("[bold]config only: sizes from config.json, no weights[/]")
    for note in report.notes:
        console.note(note)
    rows = [(key.replace("_", " "), str(value)) for key, value in report.summary.items() if value is not None]
    if report.moe:
        moe = report.moe
        rows += [("experts", f"{moe['experts']} (top-{moe['top_k']}), expert intermediate size {moe['expert_intermediate_size']}")]
        if moe.get("shared_expert_intermediate_size"):
            rows.append(("shared expert", f"intermediate size {moe['shared_expert_intermediate_size']}"))
        rows.append(("MoE layers", _progression(moe["moe_layers"]) + (f"; dense: {_progression(moe['dense_layers'])}" if moe["dense_layers"] else "")))
    rows += _kind_rows(report.layer_kinds)
    rows.append(("dtypes", ", ".join(f"{d} × {n}" for d, n in report.dtypes.items())))
    if report.config_only:
        rows.append(("size", f"{format_bytes(report.weight_bytes)} in {', '.join(report.dtypes) or 'no'} tensors "
                             "(from config.json; no weights on disk)"))
    else:
        rows.append(("shards", f"{len(report.shards)} ({format_bytes(report.bytes_on_disk)} on disk)"))
    rows.append(("parameters", f"{format_count(report.parameters)} ({report.parameters:,})"))
    if report.active_parameters is not None and report.active_parameters != report.parameters:
        rows.append(("active per token", f"{format_count(report.active_parameters)} ({report.active_parameters:,}): "
                                         "all but the routed experts a token does not use"))
        without = report.active_parameters_without_embedding
        if without is not None:
            rows.append(("active w/o embedding", f"{format_count(without)} ({without:,}): less the input embedding"))
    if report.mtp_layers or report.mtp_parameters:
        sized = (f"{format_count(report.mtp_parameters)} ({report.mtp_parameters:,}) stored" if report.mtp_parameters
                 else "not sized: their shapes are not in the family table" if report.config_only else "not stored")
        rows.append(("MTP layers", f"{report.mtp_layers or '?'} ({sized}; not in parameters)"))
    if report.nested:
        nested = report.nested
        towers = ", ".join(prefix.rstrip(".") for prefix in nested["carried_prefixes"])
        rows.append(("nested in", f"{nested['architecture']}: the text model above; {nested['carried_tensors']} "
                                  f"tensors of its other towers ({towers}: "
                                  f"{format_count(nested['carried_parameters'])} parameters, "
                                  f"{format_bytes(nested['carried_bytes'])}) are carried as bytes, not in parameters"))
    if report.quantization:
        quantization = report.quantization
        formats = "; ".join(f"{count} x {text}" for text, count in quantization["formats"].items())
        rows.append(("quantization", f"{quantization['quant_method']} ({quantization['scheme']}): "
                                     f"{quantization['quantized_tensors']} weights, "
                                     f"{format_count(quantization['quantized_parameters'])} parameters in "
                                     f"{format_bytes(quantization['quantized_bytes'])} ({formats}); the other tensors "
                                     f"{format_bytes(quantization['unquantized_bytes'])} unquantized"))
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
                     "shard": t["shard"] or "-", "offset": "-" if t["offset"] is None else str(t["offset"]),
                     "bytes": str(t["bytes"])}
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
    if report.config_only:
        return  # no weights: nothing to check against config.json
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


def _kind_rows(kinds: list | None) -> list[tuple[str, str]]:
    """The layers of each attention kind, where layers differ (the FFN kinds are the MoE layers row)."""
    if not kinds or not any("attention" in kind for kind in kinds):
        return []
    by_kind: dict[str, list[int]] = {}
    for kind in kinds:
        by_kind.setdefault(kind["attention"], []).append(kind["layer"])
    return [("attention", "; ".join(f"{name.replace('_attention', '')} × {len(layers)}: {_progression(layers)}"
                                    for name, layers in by_kind.items()))]


def _progression(values: list[int]) -> str:
    """Layers as ranges, or as 'a, b, ..., z' where they step evenly (every other layer)."""
    steps = {b - a for a, b in zip(values, values[1:])}
    if len(values) > 3 and len(steps) == 1 and steps != {1}:
        return f"{values[0]}, {values[1]}, ..., {values[-1]}"
    return _ranges(values)


def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    parts, start = [], values[0]
    for previous, current in zip(values, values[1:] + [None]):
        if current != previous + 1 if current is not None else True:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ", ".join(parts)
