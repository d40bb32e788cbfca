"""What every command that runs a model shares: --device and --memory-budget, and collecting probes.

``RunSettings`` holds the two options (the same flags on upcycle, split, merge and validate);
``runner_for`` opens a ``LayerRunner`` with them; ``Collect`` gathers what a probe sees (float32
rows on the CPU, per batch, so a merge can split them by domain).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click


@dataclass(frozen=True)
class RunSettings:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    memory_budget: str | None = None  # None / "auto": a share of the available memory
    dtype: str = "auto"  # compute dtype: auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16, float16

    def placement(self):
        from surgery.execution.placement import Placement

        return Placement.resolve(self.device, self.dtype)

    def budget(self):
        from surgery.execution.hidden import MemoryBudget

        return MemoryBudget.parse(self.memory_budget)

    def check(self) -> None:
        """Refuse a device that is not there or a budget that is not a size, before any work (torch is
        imported only when a GPU is asked for by name)."""
        self.budget()
        if self.device not in ("auto", "cpu"):
            self.placement()


class RunsModel:
    """For an operation's options dataclass with ``device``, ``memory_budget`` and ``compute_dtype`` fields: its
    ``RunSettings`` as ``.run``."""

    @property
    def run(self) -> RunSettings:
        return RunSettings(self.device, self.memory_budget, self.compute_dtype)


def run_options(func=None, *, compute_dtype: bool = True):
    """--device, --compute-dtype and --memory-budget, on every command that runs a model (validate has
    its own --dtype for the compute dtype)."""
    if func is None:
        return lambda f: run_options(f, compute_dtype=compute_dtype)
    if compute_dtype:
        func = click.option("--compute-dtype", default="auto", show_default=True,
                            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
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


def runner_for(weights, batches, settings: RunSettings, spill_dir=None, keep_layer_inputs: bool = False,
               reuse_attention: bool = False):
    from surgery.execution.runner import LayerRunner

    return LayerRunner(weights, batches, settings.placement(), settings.budget(),
                       Path(spill_dir) if spill_dir is not None else None, keep_layer_inputs, reuse_attention)


class Collect:
    """A probe's consumer that keeps every batch's rows (float32, CPU)."""

    def __init__(self):
        self.parts: list[tuple[int, object]] = []

    def __call__(self, batch: int, rows) -> None:
        self.parts.append((batch, rows.float().cpu()))

    def tensor(self):
        import torch

        return torch.cat([rows for _, rows in self.parts])

    def by_domain(self, calibration):
        """(rows grouped by domain, in domain then batch order; the domain of each row). Each batch's rows are
        released once copied, so the rows are held about once, not twice (the router fit's peak memory)."""
        import torch

        parts = sorted(self.parts, key=lambda part: (calibration.domain_of(part[0]), part[0]))
        self.parts = []
        labels = torch.cat([torch.full((len(rows),), calibration.domain_of(batch), dtype=torch.long)
                            for batch, rows in parts])
        inputs = torch.empty((len(labels), *parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
        start = 0
        while parts:
            rows = parts.pop(0)[1]
            inputs[start:start + len(rows)] = rows
            start += len(rows)
            del rows
        return inputs, labels


def router_input_probe(family, consume):
    """A probe on what the router of an MoE layer reads (for a dense model: where it will read)."""
    from surgery.execution.probes import Probe

    return Probe(family.router_input, "input", consume)
