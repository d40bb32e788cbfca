"""`surgery copy`: the identity plan. Re-shards or casts a checkpoint; the engine's end-to-end test."""

from __future__ import annotations

import json

import click

from surgery.checkpoint import Checkpoint, parse_dtype, set_config_dtype
from surgery.operations.output import OutputOptions, dtype_option, output_options, write
from surgery.plan import OutputTensor, Plan
from surgery.recipes import Copy
from surgery.safetensors_format import FLOAT_DTYPES


def output_dtype(stored: str, requested: str | None) -> str:
    """The dtype a tensor is written in: `requested` for floating tensors, else unchanged."""
    return requested if requested and stored in FLOAT_DTYPES else stored


def build_plan(source: Checkpoint, dtype: str | None = None) -> Plan:
    target = None if dtype in (None, "keep") else parse_dtype(dtype)
    tensors = [OutputTensor(name, info.shape, output_dtype(info.dtype, target), Copy(source, name))
               for name, info in source.tensors.items()]
    config = None
    if source.config is not None:
        config = dict(source.config)
        set_config_dtype(config, target)
    return Plan("copy", tensors, config, [source], side_files=source.side_files(),
                metadata={"surgery_sources": json.dumps([str(source.path)]),
                          "surgery_options": json.dumps({"dtype": dtype or "keep"})})


@click.command("copy")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@dtype_option
@output_options(verify=False, layout="keep")
def command(src, out, dtype, output):
    """Copy SRC to OUT through the streaming writer (re-shard, cast, convert the expert layout)."""
    run(src, out, dtype, output)


def run(src, out, dtype: str = "keep", output: OutputOptions = OutputOptions(layout="keep")):
    """Copy SRC to OUT (the command and ``surgery.copy`` both land here); returns a ``Result``."""
    output.check()
    with Checkpoint.open(src) as source:
        return write(build_plan(source, dtype), out, output)


# `surgery.copy(...)`: this module is also the API function (surgery.api.copy)
from surgery.api import callable_module  # noqa: E402

callable_module(__name__, ["src", "out"], OutputOptions, extra={"dtype": "keep", "layout": "keep"})
