"""Options shared by every operation that writes a checkpoint, and ``write``, which runs its plan.

``OutputOptions`` holds them; ``output_options`` puts the same flags on every writing command and
hands the command one ``output`` argument; ``write`` prints (dry run) or writes the plan with the
streaming writer, then runs the post-write check (``--verify``) and returns a ``Result``.

A dry run's source may be a directory holding only config.json (``checks.sizing.config_only``, entered by the
command): the plan is built from the headers its config implies, and the dry run says so; writing it is refused.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path

import click

from surgery import console
from surgery.checks import sizing
from surgery.errors import SurgeryError, check_choice
from surgery.families import FAMILIES
from surgery.io.checkpoint import config_only_refusal
from surgery.operations.plan_view import print_plan
from surgery.operations.result import Result
from surgery.plan.layouts import convert
from surgery.plan.nested import nest
from surgery.plan.quantized import keep_quantized
from surgery.units import format_bytes, parse_size
from surgery.writer.stream import write_plan


@dataclass(frozen=True)
class OutputOptions:
    max_shard_size: str = "5GB"  # largest shard: 500MB, 5GB, 2GiB ...
    force: bool = False  # replace OUT if it exists
    dry_run: bool = False  # print the plan, write nothing
    as_json: bool = False  # with dry_run, the plan as JSON (command line only)
    allow_nonfinite: bool = False  # write tensors that contain NaN/Inf instead of refusing
    verify: bool = False  # after writing, check OUT against its source(s)
    verify_tokens: int = 2048  # tokens of the sample --verify runs
    layout: str = "per-expert"  # experts of an MoE output: per-expert, fused, or keep (the plan's own)

    def check(self) -> None:
        parse_size(self.max_shard_size)
        if self.verify_tokens < 2:
            raise SurgeryError(f"--verify-tokens {self.verify_tokens}: must be at least 2")
        if self.as_json and not self.dry_run:
            raise SurgeryError("--json applies to --dry-run only")
        check_choice("--layout", self.layout, LAYOUT_CHOICES)


OUTPUT_FIELDS = tuple(f.name for f in fields(OutputOptions))
LAYOUT_CHOICES = ("keep", "per-expert", "fused")
@dataclass(frozen=True)
class PostWriteCheck:
    """What --verify compares OUT with: its sources, exactly (layer by layer) or by the loss change."""

    sources: list
    exact: bool
    settings: object  # RunSettings


def output_options(func=None, *, verify: bool = True, layout: str = "per-expert"):
    """--max-shard-size, --force, --dry-run, --json, --allow-nonfinite, --layout (and --verify, --verify-tokens)
    on a writing command; the command receives them as one ``output`` argument (an ``OutputOptions``).
    `layout`: the command's default --layout (copy keeps the source's)."""
    if func is None:
        return lambda f: output_options(f, verify=verify, layout=layout)

    @functools.wraps(func)
    def command(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in OUTPUT_FIELDS if name in kwargs}
        return func(*args, output=OutputOptions(**values), **kwargs)

    if verify:
        command = click.option("--verify-tokens", default=2048, show_default=True, type=click.IntRange(2),
                               help="Tokens of the validation sample --verify runs (the shipped sample text, or "
                                    "pseudo-random ids when the model has no tokenizer).")(command)
        command = click.option("--verify", is_flag=True,
                               help="After writing, check the output against its source(s): an exact result layer by "
                                    "layer (exit 2 naming the first layer that differs), any other by its loss "
                                    "change.")(command)
    choices = LAYOUT_CHOICES if layout == "keep" else LAYOUT_CHOICES[1:]
    command = click.option("--layout", default=layout, show_default=True, type=click.Choice(choices),
                           help="How an MoE output stores its experts: per-expert tensors (what llama.cpp's "
                                "converter and vLLM read) or fused as transformers 5 saves them"
                                + (", or as the source does (keep)" if layout == "keep" else "")
                                + f"; {_fused_only()} store them fused only.")(command)
    command = click.option("--allow-nonfinite", is_flag=True,
                           help="Write tensors that contain NaN/Inf instead of refusing.")(command)
    command = click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as JSON.")(command)
    command = click.option("--dry-run", is_flag=True,
                           help="Print the plan (every output tensor and its recipe); write nothing.")(command)
    command = click.option("--force", is_flag=True, help="Replace OUT if it exists.")(command)
    command = click.option("--max-shard-size", default="5GB", show_default=True,
                           help="Largest shard, in bytes: 500MB, 5GB, 2GiB ...")(command)
    return command


def _fused_only() -> str:
    return ", ".join(name for name, family in FAMILIES.items() if family.stored_layouts == ("fused",)) or "no formats"


def write(plan, out, output: OutputOptions, *, check: PostWriteCheck | None = None, fill=None):
    """Print the plan (dry run) or write it (`fill`: see ``surgery.writer.write_plan``), then run the
    post-write check when ``output.verify``. The plan's notes are printed before a dry run's plan and
    after a real write (where the user sees them last). Returns a ``Result``."""
    output.check()
    plan = nest(keep_quantized(convert(plan, output.layout)))
    out = Path(out)
    limit = parse_size(output.max_shard_size)
    result = Result(plan.operation, out, False, len(plan.tensors), plan.total_bytes, 0, plan.config,
                    list(plan.notes), plan=plan)
    config_only = [source for source in plan.sources if getattr(source, "config_only", False)]
    if output.dry_run:
        sizes = sizing.plan_sizes(plan)
        for source in config_only:
            console.note(f"config only: {source.directory} holds no weights; the plan's sizes come from its "
                         f"config.json{sizing.unsized_mtp(source.config)}")
        for message in plan.notes:
            console.note(message)
        if output.as_json:
            console.stdout.print_json(json.dumps({**plan.to_json(), **sizes, "config_only": bool(config_only)}))
        else:
            print_plan(plan, limit, sizes=sizes)
        return result
    if config_only:
        raise config_only_refusal(config_only[0].directory, f"writing {out}")

    started = time.perf_counter()
    filling = [0.0]

    def timed_fill(draft, patch):
        begun = time.perf_counter()
        try:
            return fill(draft, patch)
        finally:
            filling[0] = time.perf_counter() - begun

    shards = write_plan(plan, out, limit, force=output.force, allow_nonfinite=output.allow_nonfinite,
                        fill=timed_fill if fill else None)
    result.written, result.shards = True, len(shards)
    result.notes = list(plan.notes)  # with what a fill found on the draft
    result.seconds = time.perf_counter() - started - filling[0]
    console.info(f"wrote {out}: {len(plan.tensors)} tensors, {format_bytes(plan.total_bytes)} in {len(shards)} "
                 f"shard{'s' if len(shards) != 1 else ''} ({result.seconds:.1f} s, "
                 f"{plan.total_bytes / max(result.seconds, 1e-9) / 1e6:.0f} MB/s"
                 + (f"; {filling[0]:.1f} s running the draft" if fill else "") + ")")
    for message in plan.notes:
        console.note(message)
    if output.verify and check is not None:
        from surgery.checks.post_write import verify_written  # lazy: --verify runs models, imports torch

        result.verification = verify_written(out, check.sources, exact=check.exact, settings=check.settings,
                                             max_tokens=output.verify_tokens, rounding=plan.rounding)
    return result
