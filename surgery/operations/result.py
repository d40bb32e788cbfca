"""What an operation returns: where it wrote, what, and what the post-write check measured."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Result:
    operation: str  # copy, upcycle, split, merge
    out: Path
    written: bool  # False for a dry run
    tensors: int  # output tensors in the plan
    total_bytes: int  # bytes of tensor data (planned, or written)
    shards: int  # shard files (0 for a dry run)
    config: dict | None  # the output's config.json
    notes: list[str] = field(default_factory=list)  # what the command line prints as "note:"
    verification: dict | None = None  # --verify / verify=True: the comparison with the source(s)
    seconds: float = 0.0  # writing time (the draft's run excluded)
    plan: object = field(default=None, repr=False)  # the surgery.plan.Plan that was executed

    def summary(self) -> dict:
        """JSON-ready: everything but the plan object."""
        return {"operation": self.operation, "out": str(self.out), "written": self.written, "tensors": self.tensors,
                "total_bytes": self.total_bytes, "shards": self.shards, "notes": list(self.notes),
                "verification": self.verification, "seconds": round(self.seconds, 3)}
