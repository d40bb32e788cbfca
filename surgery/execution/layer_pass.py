"""The one layer pass: the only place that drives a model's layers over a calibration set.

Every calibrating step of every command runs through a ``LayerPass``: the router inputs of an upcycle, the
firing bits, importance and router targets of a split, the routers and RegMean Gram matrices of a merge, the
REAP / frequency scores of a prune, the new rows of add-experts, the routing statistics of validate. A step
(``Step``) only says what it does at a layer:

* ``before``: before the layer's weights are read (it may write them: RegMean++ merges the layer into the
  draft the pass reads);
* ``stop_at`` + ``fit_probes`` / ``fit``: what it collects on a pass that stops at a module's input (a router's
  input), and what it then fits and sets in the layer (``session.set_parameter``) before the layer runs;
* ``probes``: what it sees in the layer's own run, which produces the next layer's input;
* ``after``: what it computes once the layer ran, with ``rerun(probes)`` to see the same inputs again
  (``rereads`` says so beforehand, so that they are kept);
* ``finish``: what it does with the last layer's output (a head).

(``Step``, and ``Collect`` and ``router_input_probe`` that steps use, are in ``surgery.execution.step``: a module
that defines a step need not import the runner.) The pass owns everything else: the ``LayerRunner`` (weights one layer at a time, on the device, in the compute
dtype), the batches, where hidden states live (in memory or spilled beside the output), the progress bar, and
the order of the passes through each layer. Models run together (the members of a merge, a model and its
reference) step layer by layer in lockstep through ``together`` and ``lockstep``; the gradient pass of the
importance statistics runs through ``backward``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

from surgery import console
from surgery.execution.hidden import HiddenStore
from surgery.execution.runner import LayerRunner, heads
from surgery.execution.settings import MemoryBudget, RunSettings
from surgery.execution.step import Step


class LayerPass:
    """One model over a fixed set of batches, one decoder layer at a time (see the module doc)."""

    def __init__(self, weights, batches: list, placement, budget: MemoryBudget, spill_dir: Path | None = None):
        self.weights, self.batches, self.placement, self.budget = weights, batches, placement, budget
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._runner: LayerRunner | None = None

    @classmethod
    def for_settings(cls, weights, batches: list, settings: RunSettings, spill_dir=None) -> "LayerPass":
        """A pass with a command's --device, --compute-dtype and --memory-budget; hidden states that do not fit
        spill into `spill_dir` (beside the output)."""
        return cls(weights, batches, settings.placement(), settings.budget(), spill_dir)

    @property
    def num_layers(self) -> int:
        return self.weights.num_layers

    def runner(self, *, keep_layer_inputs: bool = False, reuse_attention: bool = False) -> LayerRunner:
        """The runner of this pass, made on first use: its memory plan depends on what the pass keeps (every
        layer's input, for a backward pass; the attention output of a stopped pass, replayed by the full one)."""
        if self._runner is None:
            self._runner = LayerRunner(self.weights, self.batches, self.placement, self.budget, self.spill_dir,
                                       keep_layer_inputs, reuse_attention)
        elif (keep_layer_inputs and not self._runner.keep_layer_inputs) or \
                (reuse_attention and not self._runner.reuse_attention):
            raise AssertionError("a layer pass's runner was made for less than it is now asked to keep")
        return self._runner

    # ---------------------------------------------------------------- the pass
    def forward(self, steps=(), *, final_output: bool = True, keep_inputs: bool = False,
                description: str | None = "running layers", announce: str | None = None):
        """Every batch through layers 0..last, with `steps` at each layer (see ``Step``): the last layer is the
        model's when `final_output` (the head will read it) or a step needs every layer, else the last any step
        works at. Returns the last layer's output (None when not needed), and with `keep_inputs` also the input
        of every layer run: (output, [inputs]). `announce`, then each step's ``announcement``: said once the run's
        memory plan holds (a budget too small is refused before a run is announced)."""
        steps = list(steps)
        runner = self.runner(keep_layer_inputs=keep_inputs, reuse_attention=any(s.stop_at for s in steps))
        for line in (announce, *(step.announcement for step in steps)):
            if line:
                console.info(line)
        ends = [step.last_layer for step in steps]
        last = self.num_layers - 1 if final_output or None in ends else max(ends, default=-1)
        hidden, kept = runner.embed(), []
        with _progress(description, last + 1) as advance:
            for layer in range(last + 1):
                active = [step for step in steps if step.wants(layer)]
                for step in active:
                    step.before(layer, hidden)
                with runner.layer(layer) as session:
                    out = _run_layer(layer, session, hidden, active, layer < last or final_output, keep_inputs)
                if keep_inputs:
                    kept.append(hidden)
                else:
                    _close(hidden)
                hidden = out
                advance(1, f"layer {layer}")
        for step in steps:
            step.finish(self, hidden)
        return (hidden, kept) if keep_inputs else hidden

    def backward(self, step: Step, *, lowest: int = 0, description: str = "calibration: importance") -> None:
        """Gradients of a loss on the logits at every layer from the last down to `lowest`: a forward pass keeping
        each layer's input, ``step.head_gradient(pass, last hidden, gradient store)`` (the loss back-propagated to
        the last layer's output, per batch), then each layer recomputed from its input with gradients; the
        step's probes see values and their gradients, its ``after`` runs with the layer's inputs."""
        last_hidden, inputs = self.forward(keep_inputs=True, description="calibration: forward")
        runner = self.runner()
        grad = runner.store("gradient")
        step.head_gradient(self, last_hidden, grad)
        last_hidden.close()
        with _progress(description, self.num_layers - lowest) as advance:
            for layer in reversed(range(lowest, self.num_layers)):
                with runner.layer(layer) as session:
                    wanted = step.wants(layer)
                    below = session.backward(inputs[layer], grad, step.probes(layer, session) if wanted else [])
                    if wanted:
                        step.after(layer, session, lambda probes: session.run(inputs[layer], probes, outputs=False))
                grad.close()
                inputs[layer].close()
                grad = below
                advance(1, f"layer {layer}")
        for store in inputs[:lowest]:
            store.close()
        grad.close()

    def run_layer(self, layer: int, hidden, probes=(), *, outputs: bool = True, stop_after: str | None = None):
        """Layer `layer` of this model alone on `hidden` (another model's hidden states: RegMean++ runs each
        member on the merged model's), probes attached; returns its output store (None without `outputs`)."""
        runner = self.runner()
        runner.record_calls()
        with runner.layer(layer) as session:
            return session.run(hidden, list(probes), outputs=outputs, stop_after=stop_after)

    @staticmethod
    def together(runs: list, after_layer: Callable[[int], None] | None = None, *, final_output: bool = False,
                 description: str | None = None, announce: str | None = None) -> list:
        """Several models in lockstep, layer by layer: `runs` is [(pass, steps)], each model over its own
        batches; after every model ran layer l, ``after_layer(l)`` (a merge of what each one collected there).
        Returns each model's last output (None where not needed). `announce`: as for ``forward``, said once
        every model's memory plan holds."""
        runners = [layer_pass.runner() for layer_pass, _ in runs]
        if announce:
            console.info(announce)
        hidden = [runner.embed() for runner in runners]
        count = max(layer_pass.num_layers for layer_pass, _ in runs)
        with _progress(description, count) as advance:
            for layer in range(count):
                needs_output = layer < count - 1 or final_output
                for number, (layer_pass, steps) in enumerate(runs):
                    active = [step for step in steps if step.wants(layer)]
                    with layer_pass.runner().layer(layer) as session:
                        out = _run_layer(layer, session, hidden[number], active, needs_output, False)
                    hidden[number].close()
                    hidden[number] = out
                if after_layer is not None:
                    after_layer(layer)
                advance(1, f"layer {layer}")
        return hidden

    def lockstep(self, reference: "LayerPass", hidden: HiddenStore, visit: Callable,
                 after_layer: Callable[[int], None] | None = None,
                 description: str = "comparing layers") -> HiddenStore:
        """This model and `reference` layer by layer on the same inputs, the reference's hidden states (`hidden`:
        its embedding output): at each layer and batch ``visit(layer, index, value, mine, theirs)`` runs both
        sessions on `value` and returns the reference's output, which feeds the next layer; then
        ``after_layer(layer)``. Returns the reference's last hidden states."""
        mine_runner, theirs_runner = self.runner(), reference.runner()
        with _progress(description, self.num_layers) as advance:
            for layer in range(self.num_layers):
                with mine_runner.layer(layer) as mine, theirs_runner.layer(layer) as theirs:
                    out = theirs_runner.store("output")
                    with torch.no_grad():
                        for index in range(len(self.batches)):
                            value = hidden.get(index, self.placement.device, self.placement.dtype)
                            out.put(index, visit(layer, index, value, mine, theirs))
                hidden.close()
                hidden = out
                if after_layer is not None:
                    after_layer(layer)
                advance(1, f"layer {layer}")
        return hidden

    # ---------------------------------------------------------------- ends
    def embed(self) -> HiddenStore:
        return self.runner().embed()

    def head(self, hidden: HiddenStore, consume: Callable, **options) -> None:
        """Logits of every batch from the last layer's output, in chunks of rows (``LayerRunner.head``)."""
        self.runner().head(hidden, consume, **options)

    @staticmethod
    def heads(runs: list, consume: Callable, **options) -> None:
        """The heads of several models over the same batches in lockstep: `runs` is [(pass, last hidden)]."""
        heads([(layer_pass.runner(), hidden) for layer_pass, hidden in runs], consume, **options)

    def store(self, label: str) -> HiddenStore:
        return self.runner().store(label)

    def real_tokens(self, batch: int, rows: slice):
        """The real (unpadded) tokens of rows `rows` of batch `batch`, as a mask of a [rows, length, ...] tensor."""
        return self.batches[batch].attention_mask[rows].to(bool)


def _run_layer(layer: int, session, hidden: HiddenStore, steps: list, needs_output: bool, keep: bool):
    """The passes of one layer (see ``Step``): the fitting pass, the layer's run, the steps' ``after``."""
    fitting = [step for step in steps if step.stop_at]
    if fitting:
        stops = {step.stop_at for step in fitting}
        if len(stops) > 1:
            raise AssertionError(f"layer {layer}: steps stop at different modules {sorted(stops)}")
        session.run(hidden, [probe for step in fitting for probe in step.fit_probes(layer, session)],
                    stop_after=stops.pop())
        for step in fitting:
            step.fit(layer, session)
    probes = [probe for step in steps for probe in step.probes(layer, session)]
    rereads = any(step.rereads(layer) for step in steps)
    out = None
    if needs_output or probes:
        out = session.run(hidden, probes, outputs=needs_output, consume=not (keep or rereads))
    for step in steps:
        step.after(layer, session, lambda more: session.run(hidden, more, outputs=False))
    return out


def _close(store) -> None:
    if store is not None:
        store.close()


def _progress(description: str | None, total: int):
    """The pass's progress bar; none without a description (a run in a background thread beside the writer's)."""
    if description is None:
        return contextlib.nullcontext(lambda amount, text=None: None)
    return console.progress(description, total, unit_bytes=False)
