"""A split's partitions and router rows, layer by layer, with the dense model running when data is needed.

For each MoE layer: the strategy's partition (from the weights alone, from a saved file, or from
calibration statistics of that layer) and, for ``--router-init centroid`` / ``calibrated``, the
router rows. The dense source runs one decoder layer at a time (``surgery.execution``), so the
statistics of any model size fit in memory:

* data-free strategies with a data-free router: no model run;
* ``firing`` statistics (coactivation) and calibrated routers: one forward pass; at each MoE
  layer the firing bits are gathered, the layer is partitioned, and the router targets (router
  inputs and each expert's activation mass) are gathered on the same layer, before the next one;
* ``importance`` (sharing-inner / sharing-inter): a forward pass that keeps every layer's input;
  the head gives dL/dh at the last layer (the next-token loss) and the final hidden states that
  cluster the calibration sequences; then, from the last layer down, each layer is recomputed from
  its stored input with gradients, |h * dL/dh| is summed per cluster at its down projection, the
  layer is partitioned, and the gradient of its input is passed to the layer below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from surgery import console
from surgery.errors import SurgeryError


@dataclass
class LayerSplits:
    partitions: dict = field(default_factory=dict)  # layer -> Partition
    routers: dict = field(default_factory=dict)  # layer -> [experts, hidden] rows (centroid / calibrated)
    hits: dict = field(default_factory=dict)  # layer -> oracle top-k hit rate of the calibrated router
    summary: str = ""


def layer_reader(source, family, layer: int):
    """role -> float32 numpy weights of one dense FFN matrix, refusing NaN/Inf."""
    from surgery.moe_plan import dense_ffn_names

    names = dense_ffn_names(family, layer)

    def read(role: str):
        values = source.read(names[role]).float().numpy().astype(np.float32, copy=False)
        if not np.isfinite(values.sum(dtype=np.float64)):
            nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
            if nan or inf:
                raise SurgeryError(f"{source.info(names[role]).file}: tensor {names[role]!r} has {nan} NaN and {inf} Inf "
                                   f"values; a split cannot analyse it")
        return values
    return read


def session_reader(session, family):
    """role -> float32 numpy weights of the FFN of the layer a session holds (no copy on the CPU in float32); a
    role stored fused (Phi-3's gate_up_proj) is its rows of the fused parameter."""
    from surgery import families as arch

    views = arch.source_views(family, session.runner.weights.config)
    prefix = f"model.layers.{session.layer}."

    def read(role: str):
        name = family.spec("ffn", role).name(session.layer)
        stored, start, stop = views.get(name, (name, None, None))
        value = session.parameter(stored[len(prefix):]).detach()
        return (value if start is None else value[start:stop]).float().cpu().numpy()
    return read


class _Splitter:
    """Partitions one layer at a time and fits its router; what the passes below call per layer."""

    def __init__(self, source, family, options, ffn: int, shared: int, given: dict | None):
        from surgery.partition import strategy

        self.source, self.family, self.options, self.ffn, self.shared = source, family, options, ffn, shared
        self.given = given or {}
        self.module = None if given is not None else strategy(options.strategy)
        self.result = LayerSplits(partitions=dict(self.given))

    @property
    def needs(self) -> frozenset:
        return frozenset() if self.module is None else self.module.NEEDS

    def known(self, layer: int, session=None):
        """The partition of `layer` when no calibration statistic is needed for it, else None."""
        if layer not in self.result.partitions and not self.needs:
            self.partition(layer, session=session)
        return self.result.partitions.get(layer)

    def partition(self, layer: int, importance=None, firing=None, session=None):
        """Partition `layer`; with a `session` its FFN weights are the ones already in memory (not read again)."""
        from surgery.partition import LayerInputs

        read = session_reader(session, self.family) if session is not None else layer_reader(self.source, self.family,
                                                                                             layer)
        inputs = LayerInputs(layer=layer, ffn=self.ffn, num_experts=self.options.num_experts, shared_count=self.shared,
                             seed=self.options.seed, read=read,
                             importance=importance, firing=firing, cluster_on=self.options.cluster_on)
        partition = self.module.split(inputs)
        partition.check(self.ffn, f"strategy {self.options.strategy}: layer {layer}")
        self.result.partitions[layer] = partition
        self._centroid(layer, inputs.weight)
        return partition

    def _centroid(self, layer: int, read) -> None:
        if self.options.router_init == "centroid":
            from surgery.partition.routers import centroid_router

            self.result.routers[layer] = centroid_router(read("gate"), self.result.partitions[layer])

    def centroids_of_given(self, layers) -> None:
        for layer in layers:
            if layer in self.given:
                self._centroid(layer, layer_reader(self.source, self.family, layer))

    def fit_router(self, layer: int, inputs, masses) -> None:
        from surgery.execution.routers import fit_router, oracle_hit_rate

        rows = fit_router("ridge", inputs, rows=self.options.num_experts, targets=masses)
        self.result.routers[layer] = rows
        self.result.hits[layer] = oracle_hit_rate(inputs.numpy(), masses.numpy(), rows.numpy(), self.options.top_k)

    def targets(self, session, hidden, layer: int, outputs: bool):
        """Router targets of `layer` gathered on one pass of the session (the partition must be known)."""
        from surgery.execution.neurons import ExpertMass, down_input_path, membership
        from surgery.execution.probes import Probe
        from surgery.execution.session import Collect, router_input_probe

        inputs, masses = Collect(), ExpertMass(membership(self.result.partitions[layer], self.ffn))
        out = session.run(hidden, [router_input_probe(self.family, inputs),
                                   Probe(down_input_path(self.family), "input", masses)], outputs=outputs)
        self.fit_router(layer, inputs.tensor(), masses.tensor())
        return out


def partition_layers(source, family, options, layers: list[int], ffn: int, shared: int, *, calibration=None,
                     given: dict | None = None, settings=None, spill_dir=None) -> LayerSplits:
    """Partitions (and centroid / calibrated router rows) of every layer in `layers`.

    `given`: partitions already known (a saved file); `calibration`: the CalibrationSet, needed when
    the strategy uses statistics or the router is calibrated.
    """
    splitter = _Splitter(source, family, options, ffn, shared, given)
    calibrated = options.router_init == "calibrated"
    if given is not None:
        splitter.centroids_of_given(layers)
    if not splitter.needs and not calibrated:
        with console.progress(f"{options.strategy} split", len(layers), unit_bytes=False) as advance:
            for layer in layers:
                splitter.known(layer)
                advance(1, f"layer {layer}")
        return splitter.result
    from surgery.execution.session import runner_for
    from surgery.execution.weights import ModelWeights

    importance = "importance" in splitter.needs
    runner = runner_for(ModelWeights.from_checkpoint(source), calibration.batches, settings, spill_dir,
                        keep_layer_inputs=importance)
    if importance:
        _backward_pass(runner, splitter, layers, calibration)
    else:
        _forward_pass(runner, splitter, layers, calibrated)
    splitter.result.summary = (f"{calibration.tokens} calibration tokens ({runner.placement.device}, "
                               f"{runner.placement.dtype_name})" + splitter.result.summary)
    return splitter.result


def _forward_pass(runner, splitter: _Splitter, layers: list[int], calibrated: bool) -> None:
    from surgery.execution.neurons import FiringBits, down_input_path
    from surgery.execution.probes import Probe

    def visit(layer, session, hidden):
        if layer not in layers:
            return None
        known = splitter.known(layer, session)
        if known is not None:  # data-free or saved partition: the router targets are all this layer needs
            return splitter.targets(session, hidden, layer, session.needs_output) if calibrated else None
        firing = FiringBits()
        out = session.run(hidden, [Probe(down_input_path(splitter.family), "input", firing)],
                          outputs=session.needs_output)
        splitter.partition(layer, firing=firing.bits(), session=session)
        if calibrated:
            splitter.targets(session, hidden, layer, outputs=False)
        return out

    runner.forward(visit, last=max(layers), final_output=False, description="calibration statistics")


def _backward_pass(runner, splitter: _Splitter, layers: list[int], calibration) -> None:
    """Importance |h * dL/dh| per cluster: forward keeping every layer's input, the head's gradient, then
    each layer recomputed with gradients from the last one down."""
    import torch

    from surgery.execution.neurons import ImportanceSums, down_input_path, next_token_loss, token_clusters
    from surgery.execution.probes import Probe
    from surgery.samples import Batch
    from surgery.seeds import sklearn_state

    options = splitter.options
    last_hidden, inputs = runner.forward(keep_inputs=True, description="calibration: forward")
    grads, means, pending = runner.store("gradient"), [], {}

    def consume(index, part, logits, extra):
        batch = runner.batches[index]
        chunk = Batch(batch.input_ids[part], batch.attention_mask[part])
        next_token_loss(logits, chunk).backward()
        mask = chunk.attention_mask.to(extra["norm"].device).unsqueeze(-1).float()
        norm = extra["norm"].detach().float()
        means.append(((norm * mask).sum(1) / mask.sum(1).clamp(min=1)).double().cpu())
        pending.setdefault(index, []).append(extra["last_hidden"].grad)
        if part.stop == batch.input_ids.shape[0]:
            grads.put(index, torch.cat(pending.pop(index)))

    runner.head(last_hidden, consume, grad=True, norm_output=True)
    last_hidden.close()
    labels, how = token_clusters(runner.batches, torch.cat(means).numpy(), options.num_experts,
                                 sklearn_state(options.seed, "clusters"))
    counts = torch.bincount(torch.cat(labels), minlength=options.num_experts).double()
    splitter.result.summary = f", clusters: {how}"
    lowest = min(layers)
    grad = grads
    with console.progress("calibration: importance", runner.num_layers - lowest, unit_bytes=False) as advance:
        for layer in reversed(range(lowest, runner.num_layers)):
            with runner.layer(layer) as session:
                sums = ImportanceSums(splitter.ffn, options.num_experts, labels) if layer in layers else None
                probes = [Probe(down_input_path(splitter.family), "input", sums)] if sums else []
                below = session.backward(inputs[layer], grad, probes)
                if sums is not None:
                    splitter.partition(layer, importance=sums.mean(counts), session=session)
                    if options.router_init == "calibrated":
                        splitter.targets(session, inputs[layer], layer, outputs=False)
            grad.close()
            inputs[layer].close()
            grad = below
            advance(1, f"layer {layer}")
    for store in inputs[:lowest]:
        store.close()
    if grad is not None:
        grad.close()
