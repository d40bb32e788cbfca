"""What `surgery validate` and `--verify` print: the report tables, the layer-by-layer comparison, the plot.
"""

from __future__ import annotations

from rich import box
from rich.table import Table

from surgery import console
from surgery.errors import SurgeryError

BARS = " ▁▂▃▄▅▆▇█"
MAX_BARS = 32  # experts up to which the routing table draws one bar per expert (one character each)


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}"


def compact_table(**options):
    """A rich table that fits an 80-column terminal: a rule under the header, one space between columns."""
    return Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, header_style="bold", **options)


def print_result(result: dict) -> None:
    """The report; long paths and explanations are printed as lines of their own, so every table fits in
    80 columns with no cell cut or wrapped (--json has everything)."""
    out = console.stdout
    sample = result["sample"]
    placement = result["device"] + (" (device_map=auto)" if result["device_map"] else "")
    out.print(f"MODEL: [bold]{result['model']}[/]")
    for number, reference in enumerate(result["references"], 1):
        out.print(f"ref {number}: {reference['path']}")
    out.print(f"sample: {sample['tokens']} tokens in {sample['batches']} batch(es) of {sample['source']}; {placement}, "
              f"{result['dtype']}" + (", layer by layer" if result.get("layer_by_layer") else ""))
    table = compact_table()
    table.add_column("model", no_wrap=True)
    for column in ("loss", "perplexity", "max |Δ logit|", "KL(ref‖model)", "top-1 agree"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_row("MODEL", _number(result["loss"]), _number(result["perplexity"]), "", "", "")
    for number, reference in enumerate(result["references"], 1):
        agreement = reference["top1_agreement"]
        table.add_row(f"ref {number}", _number(reference["loss"]), _number(reference["perplexity"]),
                      _number(reference["max_abs_diff"]), _number(reference["mean_kl"]),
                      "—" if agreement is None else f"{agreement:.2%}")
    out.print(table)
    if result["routing"]:
        first = result["routing"][0]
        bars = first["experts"] <= MAX_BARS
        out.print(f"routing per MoE layer: share = fraction of the top-{first['top_k']} slots per expert "
                  f"(min–max; balanced {1 / first['experts']:.3f})" + (", load = one bar per expert (full = 2/N, · = unused)"
                                                                       if bars else "")
                  + f"; entropies in nats (max ln N = {first['max_entropy']:.3f}); LB = α·N·Σ u·p, α = "
                  f"{first['load_balancing_alpha']:g}")
        routing = compact_table()
        columns = ["layer"] + (["load"] if bars else []) + ["share", "unused", "H(load)", "H(router)", "LB", "z-loss"]
        for column in columns:
            routing.add_column(column, justify="left" if column == "load" else "right", no_wrap=True)
        for layer in result["routing"]:
            share = layer["share"]
            unused = layer["unused_experts"]
            cells = [str(layer["layer"])] + ([load_bars(share)] if bars else []) + [
                f"{min(share):.2f}–{max(share):.2f}", str(len(unused)), f"{layer['load_entropy']:.3f}",
                f"{layer['router_entropy']:.3f}", f"{layer['load_balancing_loss']:.4g}", f"{layer['router_z_loss']:.4g}"]
            routing.add_row(*cells)
        out.print(routing)
        unused = {layer["layer"]: layer["unused_experts"] for layer in result["routing"] if layer["unused_experts"]}
        for layer, experts in unused.items():
            out.print(f"layer {layer}: unused experts {', '.join(map(str, experts))}")
    timing = result["timing"]
    if timing["tokens_per_second"]:
        out.print(f"[dim]load {timing['load_seconds']:.1f} s, evaluation {timing['eval_seconds']:.1f} s "
                  f"({timing['tokens_per_second']:.0f} tokens/s)[/]")
    if result["exact"]:
        print_exact(result["exact"], "expect-exact")


def print_exact(report: dict, title: str = "verify") -> None:
    """The layer-by-layer comparison: relative difference of each part, and the verdict."""
    out = console.stdout
    out.print(f"{title}: ‖Δ‖/‖reference‖ of each part, every layer of both models on the same inputs "
              f"({report['dtype']})")
    table = compact_table()
    for column in ("layer", "attention", "FFN / MoE", "output"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_row("embedding", "", "", _relative(report["embedding"]))
    for row in report["layers"]:
        table.add_row(str(row["layer"]), _relative(row["attention"]), _relative(row["mlp"]), _relative(row["output"]))
    table.add_row("head", "", "", _relative(report["head"]))
    out.print(table)
    if report["passed"]:
        out.print(f"{title}: [green]passed[/]: largest relative difference {_relative(report['max_relative'])} "
                  f"(tolerance {report['tolerance']:.1e})")
    else:
        out.print(f"{title}: [red]FAILED[/]: {report['message']}")


def _relative(value) -> str:
    return "NaN" if value is None or value != value else f"{value:.1e}"


def require_matplotlib():
    try:
        import matplotlib  # lazy: an optional dependency, needed by --plot only
    except ImportError:
        raise SurgeryError("--plot needs matplotlib, which is not installed: pip install 'surgery[plot]' "
                           "(or pip install matplotlib)") from None
    return matplotlib


def plot_load(result: dict, path) -> None:
    """Heat map of expert load (share of top-k assignments), layers × experts."""
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    routing = result["routing"]
    shares = [layer["share"] for layer in routing]
    figure, axes = plt.subplots(figsize=(max(5, 0.4 * len(shares[0]) + 2), max(3, 0.3 * len(shares) + 1.5)))
    image = axes.imshow(shares, aspect="auto", cmap="viridis", vmin=0)
    from matplotlib.ticker import MaxNLocator  # lazy: as above

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_yticks(range(len(routing)), [str(layer["layer"]) for layer in routing])
    axes.set_title(f"share of top-k assignments (balanced: {1 / len(shares[0]):.3g})", fontsize=10)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise SurgeryError(f"--plot {path}: cannot write: {exc.strerror}") from None
    finally:
        plt.close(figure)


def load_bars(share: list[float]) -> str:
    """One character per expert, full height at twice the balanced share (1/N); blank = unused."""
    balanced = 1 / len(share)
    out = []
    for value in share:
        if value <= 0:
            out.append("·")
        else:
            level = min(len(BARS) - 1, max(1, round(value / (2 * balanced) * (len(BARS) - 1))))
            out.append(BARS[level])
    return "".join(out)
