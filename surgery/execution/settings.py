"""Where and how a model runs: the settings every command that runs a model shares.

``RunSettings`` holds ``--device``, ``--memory-budget`` (read as a ``MemoryBudget``) and ``--compute-dtype`` (the options themselves are
declared once, in ``surgery.operations.options``); an operation's options dataclass with those three fields
gets its ``RunSettings`` as ``.run`` by deriving from ``RunOptions``.
"""

from __future__ import annotations

from dataclasses import dataclass

from surgery.errors import SurgeryError
from surgery.process_memory import available_memory
from surgery.units import format_bytes, parse_size

AUTO_SHARE = 0.8  # --memory-budget auto: this share of the memory available when the run starts


@dataclass(frozen=True)
class MemoryBudget:
    """How much CPU memory a model run may use for weights and hidden states."""

    limit: int  # bytes
    text: str  # how the user set it, for messages

    @classmethod
    def parse(cls, text: str | None) -> "MemoryBudget":
        if text is None or str(text).strip().lower() == "auto":
            limit = int(available_memory() * AUTO_SHARE)
            return cls(limit, f"auto ({AUTO_SHARE:.0%} of available memory: {format_bytes(limit)})")
        try:
            limit = parse_size(text)
        except SurgeryError:
            raise SurgeryError(f"--memory-budget {text!r}: expected auto or a size such as 4GiB, 800MB") from None
        if limit <= 0:
            raise SurgeryError(f"--memory-budget {text!r}: must be positive")
        return cls(limit, f"--memory-budget {text}")


@dataclass(frozen=True)
class RunSettings:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    memory_budget: str | None = None  # None / "auto": a share of the available memory
    dtype: str = "auto"  # compute dtype: auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16, float16

    def placement(self):
        from surgery.execution.placement import Placement  # lazy: resolving a device imports torch

        return Placement.resolve(self.device, self.dtype)

    def budget(self) -> MemoryBudget:
        return MemoryBudget.parse(self.memory_budget)

    def check(self) -> None:
        """Refuse a device that is not there or a budget that is not a size, before any work (torch is
        imported only when a GPU is asked for by name)."""
        self.budget()
        if self.device not in ("auto", "cpu"):
            self.placement()


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The options of every command that runs a model, declared once: an operation's options dataclass derives
    from this one (its own fields stay positional; these are keywords) and gets its ``RunSettings`` as ``.run``."""

    device: str = "auto"
    memory_budget: str | None = None
    compute_dtype: str = "auto"

    @property
    def run(self) -> RunSettings:
        return RunSettings(self.device, self.memory_budget, self.compute_dtype)
