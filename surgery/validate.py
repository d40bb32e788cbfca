"""`surgery validate`: loss on a sample batch, comparison with references, routing statistics.

What it computes is ``surgery.checks.validation``'s (a structure check from headers, a strict load or a
layer-by-layer run, running sums batch by batch); what it prints, ``surgery.checks.report_view``'s. The
tolerances of ``--expect-exact`` are explained in docs/validate.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import click

from surgery import console
from surgery.checks.report_view import plot_load, print_result, require_matplotlib
from surgery.checks.structure import check_structure, print_structure, problems_error
from surgery.errors import SurgeryError
from surgery.operations.options import COMPUTE_DTYPES, run_options


@dataclass(frozen=True)
class ValidateOptions:
    references: tuple = ()  # checkpoints to compare MODEL with
    data: str | None = None  # a UTF-8 text file, tokenised with MODEL's tokenizer
    text: str | None = None  # text to evaluate on
    tokens: str | None = None  # pre-tokenised ids: .npy, .pt or .jsonl
    batch_size: int = 8
    seq_len: int = 256
    max_tokens: int | None = None
    device: str = "auto"
    dtype: str = "auto"  # the compute dtype: auto is bfloat16 on a GPU, float32 on the CPU (--expect-exact: float32)
    expect_exact: bool = False  # raise unless MODEL reproduces the single reference layer by layer
    stream: bool | None = None  # run one decoder layer at a time (None: only when MODEL does not fit in memory)
    memory_budget: str | None = None


@click.command("validate")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--reference", "-r", "references", multiple=True, type=click.Path(path_type=str),
              help="A checkpoint to compare MODEL with (repeatable).")
@click.option("--data", type=click.Path(path_type=str), help="UTF-8 text file, tokenised with MODEL's tokenizer.")
@click.option("--text", help="Text to evaluate on, tokenised with MODEL's tokenizer.")
@click.option("--tokens", type=click.Path(path_type=str), help="Pre-tokenised ids: .npy, .pt or .jsonl.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(2), help="Tokens per row.")
@click.option("--max-tokens", type=click.IntRange(1), help="Stop after this many real tokens.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(COMPUTE_DTYPES),
              help="Compute dtype. auto: bfloat16 on CUDA, float32 on CPU (--expect-exact: float32).")
@click.option("--stream/--no-stream", default=None,
              help="Run one decoder layer at a time (default: only when MODEL does not fit in memory).")
@run_options(compute_dtype=False)
@click.option("--expect-exact", is_flag=True,
              help="Exit non-zero unless MODEL reproduces the single reference layer by layer (attention, FFN/MoE, "
                   "layer output, logits) within float noise.")
@click.option("--structure-only", is_flag=True,
              help="Only check tensors, shapes, index and NaN/Inf from the files; load no model.")
@click.option("--plot", type=click.Path(path_type=str), help="Write the layer × expert load heat map (PNG; needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(model, structure_only, plot, as_json, **options):
    """Load MODEL, measure its loss, compare it with references, and show MoE routing statistics."""
    if structure_only:
        report = check_structure(model, scan=True)
        if as_json:
            console.stdout.print_json(json.dumps(report))
        else:
            print_structure(report)
        if report["problems"]:
            raise problems_error(model, report)
        return
    from surgery.checks.validation import evaluate, exact_error, is_moe  # lazy: runs models, imports torch

    if plot:
        if not is_moe(model):
            raise SurgeryError(f"--plot: {model} is a dense model; there is no routing to plot")
        require_matplotlib()
    result = evaluate(model, **vars(ValidateOptions(**options)))
    if as_json:
        console.stdout.print_json(json.dumps(result))
    else:
        print_result(result)
    if plot:
        plot_load(result, plot)
        console.info(f"wrote {plot}")
    error = exact_error(result)
    if error is not None:
        raise error


def run(model, options: ValidateOptions = ValidateOptions()) -> dict:
    """Loss of MODEL on a sample (and of each reference on the same tokens), routing statistics of an
    MoE, and with `expect_exact` the layer-by-layer comparison with the one reference (raises
    ``SurgeryError`` when it fails). Returns the report dict (what ``surgery validate --json`` prints)."""
    from surgery.checks.validation import validate  # lazy: runs models, imports torch

    return validate(str(model), [str(r) for r in options.references],
                    **{key: value for key, value in vars(options).items() if key != "references"})
