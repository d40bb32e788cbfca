"""What a step of the layer pass is (``Step``), and what steps collect with (``Collect``, ``router_input_probe``).

The layer pass (``surgery.execution.layer_pass``) calls a step's hooks at each layer; this module holds only the
protocol, so code that defines a step imports neither the runner nor transformers.
"""

from __future__ import annotations

from typing import Callable

import torch

from surgery.execution.hidden import HiddenStore
from surgery.execution.probes import Probe


class Step:
    """One job a pass does at the layers of a model; every hook does nothing unless a step says otherwise."""

    stop_at: str | None = None  # module whose input `fit_probes` see on a pass that stops there, before `fit`
    last_layer: int | None = None  # the last layer the step works at (None: every layer, the head too)
    announcement: str | None = None  # what the step says when the pass starts (once its memory plan holds)

    def wants(self, layer: int) -> bool:
        """Whether the step works at `layer` (its hooks are called only there)."""
        return True

    def before(self, layer: int, hidden: HiddenStore) -> None:
        """Before the layer's weights are read."""

    def fit_probes(self, layer: int, session) -> list[Probe]:
        return []

    def fit(self, layer: int, session) -> None:
        """After the pass stopped at ``stop_at``: fit, and set what was fitted in the layer before it runs."""

    def probes(self, layer: int, session) -> list[Probe]:
        """What the step sees in the layer's run."""
        return []

    def rereads(self, layer: int) -> bool:
        """Whether ``after`` will run the layer's inputs again (so they are not dropped as they are used)."""
        return False

    def after(self, layer: int, session, rerun: Callable[[list[Probe]], None]) -> None:
        """Once the layer ran; ``rerun(probes)`` runs its inputs through it again, outputs discarded."""

    def finish(self, layer_pass, hidden: HiddenStore | None) -> None:
        """After the last layer (`layer_pass`: the ``LayerPass``), with its output (None when no step needed it)."""


class Collect:
    """A probe's consumer that keeps every batch's rows (float32, CPU)."""

    def __init__(self):
        self.parts: list[tuple[int, object]] = []

    def __call__(self, batch: int, rows) -> None:
        self.parts.append((batch, rows.float().cpu()))

    def tensor(self):
        return torch.cat([rows for _, rows in self.parts])

    def by_domain(self, calibration):
        """(rows grouped by domain, in domain then batch order; the domain of each row). Each batch's rows are
        released once copied, so the rows are held about once, not twice (the router fit's peak memory)."""
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


def router_input_probe(family, consume) -> Probe:
    """A probe on what the router of an MoE layer reads (for a dense model: where it will read)."""
    return Probe(family.router_input, "input", consume)


class RouterInputs(Step):
    """A step that sees the router's input at each layer of `layers` (``self.inputs``, a ``Collect`` per layer):
    on the layer's own run, or, when it fits the router before the layer runs (``stop_at``: the router's input
    module), on a pass stopped there."""

    def __init__(self, family, layers, fits_before_run: bool = False):
        self.family, self.layers, self.last_layer = family, set(layers), max(layers)
        self.stop_at = family.router_input if fits_before_run else None
        self.inputs: Collect | None = None

    def wants(self, layer: int) -> bool:
        return layer in self.layers

    def _collect(self) -> list[Probe]:
        self.inputs = Collect()
        return [router_input_probe(self.family, self.inputs)]

    def fit_probes(self, layer: int, session) -> list[Probe]:
        return self._collect()

    def collected(self) -> Collect:
        """The router inputs of the layer just seen, handed over: the step keeps none (they are tokens x hidden
        float32, not to be held while the next layer is read)."""
        inputs, self.inputs = self.inputs, None
        return inputs

    def probes(self, layer: int, session) -> list[Probe]:
        return [] if self.stop_at else self._collect()
