"""A split's partitions and router rows, layer by layer, with the dense model running when data is needed.

For each MoE layer: the strategy's partition (from the weights alone, from a saved file, or from
calibration statistics of that layer) and, for ``--router-init centroid`` / ``calibrated``, the
router rows. The dense source runs through the layer pass (``surgery.execution.layer_pass``), one decoder
layer at a time, so the statistics of any model size fit in memory:

* data-free strategies with a data-free router: no model run;
* ``firing`` statistics (coactivation) and calibrated routers: one forward pass (``FiringSplit``); at each MoE
  layer the firing bits are gathered, the layer is partitioned, and the router targets (router inputs and
  each expert's activation mass) are gathered on the same layer, before the next one;
* ``importance`` (sharing-inner / sharing-inter): the pass's gradient run (``ImportanceSplit``); the head
  gives dL/dh at the last layer (the next-token loss) and the final hidden states that cluster the
  calibration sequences; then, from the last layer down, each layer is recomputed from its stored input with
  gradients, |h * dL/dh| is summed per cluster at its down projection, and the layer is partitioned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from surgery import console
from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.execution.batches import Batch
from surgery.execution.layer_pass import LayerPass
from surgery.execution.neurons import (ExpertMass, FiringBits, ImportanceSums, down_input_path, membership,
                                       next_token_loss, token_clusters)
from surgery.execution.probes import Probe
from surgery.execution.routers.measure import oracle_hit_rate
from surgery.execution.routers.registry import make
from surgery.execution.routers.request import RouterRequest
from surgery.execution.step import Collect, Step, router_input_probe
from surgery.execution.weights import ModelWeights
from surgery.io.finite import nonfinite_counts
from surgery.partition import LayerInputs, strategy
from surgery.partition.base import normalize_rows
from surgery.plan.moe import dense_ffn_names
from surgery.seeds import sklearn_state


@dataclass
class LayerSplits:
    partitions: dict = field(default_factory=dict)  # layer -> Partition
    routers: dict = field(default_factory=dict)  # layer -> [experts, hidden] rows (centroid / calibrated)
    hits: dict = field(default_factory=dict)  # layer -> oracle top-k hit rate of the calibrated router
    summary: str = ""


def layer_reader(source, family, layer: int):
    """role -> float32 numpy weights of one dense FFN matrix, refusing NaN/Inf."""
    names = dense_ffn_names(family, layer)

    def read(role: str):
        values = source.read(names[role]).float().numpy().astype(np.float32, copy=False)
        found = nonfinite_counts(values)
        if found is not None:
            raise SurgeryError(f"{source.info(names[role]).file}: tensor {names[role]!r} has {found[0]} NaN and "
                               f"{found[1]} Inf values; a split cannot analyse it")
        return values
    return read


def session_reader(session, family):
    """role -> float32 numpy weights of the FFN of the layer a session holds (no copy on the CPU in float32); a
    role stored fused (Phi-3's gate_up_proj) is its rows of the fused parameter."""
    views = arch.source_views(family, session.runner.weights.config)
    prefix = f"model.layers.{session.layer}."

    def read(role: str):
        name = family.spec("ffn", role).name(session.layer)
        stored, start, stop = views.get(name, (name, None, None))
        value = session.parameter(stored[len(prefix):]).detach()
        return (value if start is None else value[start:stop]).float().cpu().numpy()
    return read


class Splitter(Step):
    """Partitions one layer at a time and fits its router: what the passes below do at each MoE layer."""

    def __init__(self, source, family, options, layers: list[int], ffn: int, shared: int, given: dict | None):
        self.source, self.family, self.options, self.ffn, self.shared = source, family, options, ffn, shared
        self.layers, self.last_layer = layers, max(layers)
        self.given = given or {}
        self.module = None if given is not None else strategy(options.strategy)
        self.result = LayerSplits(partitions=dict(self.given))
        self.calibrated = options.router_init == "calibrated"
        self._targets = None  # (router inputs, expert masses) being collected at the current layer

    @property
    def needs(self) -> frozenset:
        return frozenset() if self.module is None else self.module.NEEDS

    def wants(self, layer: int) -> bool:
        return layer in self.layers

    def known(self, layer: int, session=None):
        """The partition of `layer` when no calibration statistic is needed for it, else None."""
        if layer not in self.result.partitions and not self.needs:
            self.partition(layer, session=session)
        return self.result.partitions.get(layer)

    def partition(self, layer: int, importance=None, firing=None, session=None):
        """Partition `layer`; with a `session` its FFN weights are the ones already in memory (not read again)."""
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
            request = RouterRequest(self.options.num_experts, 0, inputs=normalize_rows(read("gate")),
                                    targets=self.result.partitions[layer].experts)
            self.result.routers[layer] = make("centroid", request).rows

    def centroids_of_given(self) -> None:
        for layer in self.layers:
            if layer in self.given:
                self._centroid(layer, layer_reader(self.source, self.family, layer))

    def target_probes(self, layer: int) -> list[Probe]:
        """Probes that gather the router targets of `layer` (its partition must be known): the router inputs and
        each expert's activation mass."""
        self._targets = Collect(), ExpertMass(membership(self.result.partitions[layer], self.ffn))
        return [router_input_probe(self.family, self._targets[0]),
                Probe(down_input_path(self.family), "input", self._targets[1])]

    def fit_router(self, layer: int) -> None:
        """The calibrated (ridge) router of `layer` from the targets gathered."""
        inputs, masses = self._targets[0].tensor(), self._targets[1].tensor()
        self._targets = None
        rows = make("ridge", RouterRequest(self.options.num_experts, int(inputs.shape[1]), inputs=inputs,
                                           targets=masses)).rows
        self.result.routers[layer] = rows
        self.result.hits[layer] = oracle_hit_rate(inputs.numpy(), masses.numpy(), rows.numpy(), self.options.top_k)


class FiringSplit(Splitter):
    """The forward pass: at each MoE layer its firing bits (when the strategy uses them) and its router targets."""

    _firing = None

    def probes(self, layer: int, session) -> list[Probe]:
        if self.known(layer, session) is not None:  # data-free or saved partition: the router targets only
            return self.target_probes(layer) if self.calibrated else []
        self._firing = FiringBits()
        return [Probe(down_input_path(self.family), "input", self._firing)]

    def rereads(self, layer: int) -> bool:
        return self.calibrated and layer not in self.result.partitions

    def after(self, layer: int, session, rerun) -> None:
        if self._firing is not None:
            self.partition(layer, firing=self._firing.bits(), session=session)
            self._firing = None
            if self.calibrated:
                rerun(self.target_probes(layer))
        if self._targets is not None:
            self.fit_router(layer)


class ImportanceSplit(Splitter):
    """The gradient pass: the head's next-token loss, calibration clusters of the sequences, then at each MoE layer
    from the last down |h * dL/dh| per cluster, the partition, and its router targets."""

    _sums = None

    def head_gradient(self, layer_pass: LayerPass, last_hidden, grad) -> None:
        means, pending = [], {}

        def consume(index, part, logits, extra):
            batch = layer_pass.batches[index]
            chunk = Batch(batch.input_ids[part], batch.attention_mask[part])
            next_token_loss(logits, chunk).backward()
            mask = chunk.attention_mask.to(extra["norm"].device).unsqueeze(-1).float()
            norm = extra["norm"].detach().float()
            means.append(((norm * mask).sum(1) / mask.sum(1).clamp(min=1)).double().cpu())
            pending.setdefault(index, []).append(extra["last_hidden"].grad)
            if part.stop == batch.input_ids.shape[0]:
                grad.put(index, torch.cat(pending.pop(index)))

        layer_pass.head(last_hidden, consume, grad=True, norm_output=True)
        options = self.options
        self.labels, how = token_clusters(layer_pass.batches, torch.cat(means).numpy(), options.num_experts,
                                          sklearn_state(options.seed, "clusters"))
        self.counts = torch.bincount(torch.cat(self.labels), minlength=options.num_experts).double()
        self.result.summary = f", clusters: {how}"

    def probes(self, layer: int, session) -> list[Probe]:
        self._sums = ImportanceSums(self.ffn, self.options.num_experts, self.labels)
        return [Probe(down_input_path(self.family), "input", self._sums)]

    def after(self, layer: int, session, rerun) -> None:
        self.partition(layer, importance=self._sums.mean(self.counts), session=session)
        if self.calibrated:
            rerun(self.target_probes(layer))
            self.fit_router(layer)


def partition_layers(source, family, options, layers: list[int], ffn: int, shared: int, *, calibration=None,
                     given: dict | None = None, settings=None, spill_dir=None) -> LayerSplits:
    """Partitions (and centroid / calibrated router rows) of every layer in `layers`.

    `given`: partitions already known (a saved file); `calibration`: the CalibrationSet, needed when
    the strategy uses statistics or the router is calibrated.
    """
    importance = strategy(options.strategy).NEEDS if given is None else frozenset()
    splitter = (ImportanceSplit if "importance" in importance else FiringSplit)(source, family, options, layers, ffn,
                                                                              shared, given)
    if given is not None:
        splitter.centroids_of_given()
    if not splitter.needs and not splitter.calibrated:
        with console.progress(f"{options.strategy} split", len(layers), unit_bytes=False) as advance:
            for layer in layers:
                splitter.known(layer)
                advance(1, f"layer {layer}")
        return splitter.result
    layer_pass = LayerPass.for_settings(ModelWeights.from_checkpoint(source), calibration.batches, settings, spill_dir)
    if isinstance(splitter, ImportanceSplit):
        layer_pass.backward(splitter, lowest=min(layers))
    else:
        layer_pass.forward([splitter], final_output=False, description="calibration statistics")
    splitter.result.summary = (f"{calibration.tokens} calibration tokens ({layer_pass.placement.device}, "
                               f"{layer_pass.placement.dtype_name})" + splitter.result.summary)
    return splitter.result
