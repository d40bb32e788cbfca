"""The command registry: every command of ``surgery``, one entry each.

The command line (``surgery.cli``), the Python API (``surgery.api``) and the package (``surgery.upcycle(...)``)
all read this table; nothing else lists the commands. An entry names the command's entry module
(``surgery/<module>.py``, holding its options dataclass, its click ``command`` and ``run``), the one line
``surgery --help`` shows, and how the API calls ``run``: its positional parameters, its options dataclass, and
whether (with which defaults) it takes the output options of a writing command. Adding a command is one entry
module plus one line here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Command:
    name: str  # on the command line
    module: str  # the entry module, surgery.<module>
    summary: str  # `surgery --help`'s line
    positional: tuple[str, ...]  # the API's positional parameters, in order
    options: str  # the entry module's options dataclass: the API's keywords and their defaults
    writes: bool = True  # takes OutputOptions (--max-shard-size, --force, --dry-run ...)
    output_defaults: dict = field(default_factory=dict)  # the API's OutputOptions defaults where the command differs
    api: str | None = None  # the API function's name (surgery.<api>); default: the module's

    @property
    def function(self) -> str:
        return self.api or self.module


COMMANDS = {command.name: command for command in (
    Command("inspect", "inspect", "Show a checkpoint's layout, architecture, parameters and problems.",
            ("path",), "InspectOptions", writes=False),
    Command("copy", "copy", "Re-shard or cast a checkpoint (identity plan).",
            ("src", "out"), "CopyOptions", output_defaults={"layout": "keep"}),
    Command("upcycle", "upcycle", "Dense -> MoE: copy the FFN into N experts and add a router.",
            ("src", "out", "num_experts", "top_k"), "UpcycleOptions"),
    Command("split", "split", "Dense -> MoE: partition each FFN's neurons into N smaller experts.",
            ("src", "out", "num_experts", "top_k"), "SplitOptions"),
    Command("merge", "btx_merge", "Branch-Train-MiX: merge domain-trained copies into one MoE.",
            ("out", "experts"), "MergeOptions", api="merge"),
    Command("prune", "prune", "MoE -> MoE: keep the best-scored routed experts of every MoE layer.",
            ("moe", "out"), "PruneOptions", output_defaults={"layout": "keep"}),
    Command("extract", "extract", "MoE -> dense: one expert's FFN, or the experts' averaged, in every layer.",
            ("moe", "out"), "ExtractOptions"),
    Command("add-experts", "add_experts", "MoE -> MoE: each dense model's FFN as a new expert in every MoE layer.",
            ("moe", "out"), "AddExpertsOptions", output_defaults={"layout": "keep"}),
    Command("validate", "validate", "Load a model, measure loss, compare with references, show routing.",
            ("model", "references"), "ValidateOptions", writes=False),
    Command("verify", "verify", "Check a written checkpoint's structure and manifest.",
            ("out",), "VerifyOptions", writes=False),
)}
BY_MODULE = {command.module: command for command in COMMANDS.values()}
BY_FUNCTION = {command.function: command for command in COMMANDS.values()}
