"""The options several commands share, declared once: how a model runs, calibration data, output dtype, and
``NAME=VALUE`` arguments.

* ``run_options``: ``--device``, ``--compute-dtype``, ``--memory-budget`` (read into ``RunSettings``);
* ``calibration_options``: ``--calibration`` and ``--calibration-tokens``, the default taken from the command's
  options dataclass (each command's own default lives in one place: its dataclass);
* ``dtype_option``: ``--dtype keep|fp32|bf16|fp16`` of the written tensors; ``FORMATS``: the ``--format`` choices;
* ``parse_pairs`` / ``unique_pairs``: ``NAME=VALUE`` arguments (``--expert code=DIR``, ``--calibration
  code=FILE``), or a dict where the Python API passes one.
"""

from __future__ import annotations

import dataclasses

import click

from surgery.errors import SurgeryError
from surgery.families import moe_formats

FORMATS = ("auto", *moe_formats())  # --format of every dense -> MoE command: auto, or an MoE family
OUTPUT_DTYPES = ("keep", "fp32", "bf16", "fp16")  # --dtype of every writing command
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def run_options(func=None, *, compute_dtype: bool = True):
    """--device, --compute-dtype and --memory-budget, on every command that runs a model (validate has
    its own --dtype for the compute dtype)."""
    if func is None:
        return lambda f: run_options(f, compute_dtype=compute_dtype)
    if compute_dtype:
        func = click.option("--compute-dtype", default="auto", show_default=True, type=click.Choice(COMPUTE_DTYPES),
                            help="dtype the model runs in while calibrating: auto = bfloat16 on a GPU, float32 on "
                                 "the CPU (bfloat16 is much faster on CPUs with native bfloat16 matmul).")(func)
    func = click.option("--memory-budget", default=None, metavar="SIZE|auto",
                        help="CPU memory for one layer's weights and the calibration hidden states; hidden states "
                             "that do not fit go to a temporary file beside the output, and an MoE layer that does not "
                             "fit is run one expert at a time [default: auto, 80% of the available memory].")(func)
    func = click.option("--device", default="auto", show_default=True,
                        help="Where the model runs: auto (the GPU when there is one, bfloat16 there; else the CPU, "
                             "float32), cpu, cuda or cuda:N.")(func)
    return func


def calibration_options(options_class, *, calibration: str, tokens: str = "Calibration tokens used at most.",
                        multiple: bool = False, metavar: str | None = None):
    """--calibration (help `calibration`; repeatable NAME=FILE with `multiple`) and --calibration-tokens, whose
    default is the `calibration_tokens` field of the command's options dataclass."""
    default = next(field.default for field in dataclasses.fields(options_class) if field.name == "calibration_tokens")

    def decorate(func):
        func = click.option("--calibration-tokens", default=default, show_default=True, type=click.IntRange(2),
                            help=tokens)(func)
        return click.option("--calibration", multiple=multiple, default=None, metavar=metavar, help=calibration)(func)
    return decorate


def dtype_option(func):
    """--dtype keep|fp32|bf16|fp16: the output's floating-point dtype (keep: the inputs')."""
    return click.option("--dtype", default="keep", show_default=True, type=click.Choice(OUTPUT_DTYPES),
                        help="Output dtype of floating-point tensors (keep: the inputs').")(func)


def parse_pairs(values, option: str, what: str) -> list[tuple[str, str]]:
    """[(NAME, VALUE)] in order from NAME=VALUE strings, or from a dict (the Python API's form)."""
    if isinstance(values, dict):
        return [(str(name), str(value)) for name, value in values.items()]
    pairs = []
    for text in values or ():
        name, sep, value = str(text).partition("=")
        if not sep or not name.strip() or not value.strip():
            raise SurgeryError(f"{option} {text!r}: expected NAME={what}")
        pairs.append((name.strip(), value.strip()))
    return pairs


def unique_pairs(values, option: str, what: str) -> dict[str, str]:
    """``parse_pairs`` as a dict, refusing a name given twice."""
    out = {}
    for name, value in parse_pairs(values, option, what):
        if name in out:
            raise SurgeryError(f"{option} {name}={value}: {name} is given twice")
        out[name] = value
    return out
