"""What every split strategy receives and returns.

A strategy looks at one layer at a time (``LayerInputs``: that layer's FFN weights, read lazily,
and the calibration statistics of that layer when the strategy needs them) and returns a
``Partition``: for each routed expert the indices of the FFN neurons it holds, and the indices of
the shared neurons every token uses. Strategies that partition give disjoint expert sets; a
strategy may let experts overlap (sharing-inner) as long as every neuron is held somewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from surgery.errors import SurgeryError
from surgery.seeds import derive, generator


@dataclass
class Partition:
    """One layer's neuron assignment: expert j holds neurons experts[j]; shared neurons are always on."""

    experts: list[np.ndarray]
    shared: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    stats: dict = field(default_factory=dict)  # strategy facts shown to the user (cosine spread ...)

    def __post_init__(self):
        self.experts = [np.asarray(e, dtype=np.int64) for e in self.experts]
        self.shared = np.asarray(self.shared, dtype=np.int64)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def largest_expert(self) -> int:
        return max(len(e) for e in self.experts)

    def holders(self, ffn: int) -> np.ndarray:
        """For each neuron, how many routed experts hold it (0 for shared neurons)."""
        count = np.zeros(ffn, dtype=np.int64)
        for expert in self.experts:
            np.add.at(count, expert, 1)
        return count

    @property
    def overlapping(self) -> bool:
        every = np.concatenate(self.experts)
        return len(np.unique(every)) != len(every)

    def check(self, ffn: int, where: str) -> None:
        """Every neuron is shared or held by at least one expert; nothing is out of range or repeated."""
        for j, expert in enumerate(self.experts):
            if len(expert) == 0:
                raise SurgeryError(f"{where}: expert {j} holds no neuron")
            if len(np.unique(expert)) != len(expert):
                raise SurgeryError(f"{where}: expert {j} lists a neuron twice")
        every = np.concatenate(self.experts + [self.shared])
        bad = every[(every < 0) | (every >= ffn)]
        if len(bad):
            raise SurgeryError(f"{where}: neuron {int(bad[0])} is out of range (the FFN has {ffn} neurons: 0-{ffn - 1})")
        if len(np.unique(self.shared)) != len(self.shared):
            raise SurgeryError(f"{where}: the shared part lists a neuron twice")
        routed = self.holders(ffn)
        both = np.flatnonzero(routed[self.shared] > 0)
        if len(both):
            raise SurgeryError(f"{where}: neuron {int(self.shared[both[0]])} is both shared and in a routed expert")
        covered = routed.copy()
        covered[self.shared] += 1
        missing = np.flatnonzero(covered == 0)
        if len(missing):
            raise SurgeryError(f"{where}: neuron {int(missing[0])} is in no expert and not shared "
                               f"({len(missing)} neurons uncovered); the split would drop them")


@dataclass
class LayerInputs:
    """Everything a strategy may use for one layer. Weights are read on first use, then kept for this layer only."""

    layer: int
    ffn: int
    num_experts: int
    shared_count: int
    seed: int
    read: Callable[[str], np.ndarray]  # role ("gate", "up", "down") -> float32 array
    importance: np.ndarray | None = None  # [calibration clusters, ffn]: mean |h * dL/dh| per cluster
    firing: np.ndarray | None = None  # [tokens, ceil(ffn / 8)] packed bits: |h| above the layer's quantile
    cluster_on: str = "up"
    _cache: dict = field(default_factory=dict)

    def weight(self, role: str) -> np.ndarray:
        if role not in self._cache:
            self._cache[role] = self.read(role)
        return self._cache[role]

    def rng(self, purpose: str = "") -> np.random.Generator:
        """A generator of the stream (seed, purpose, layer): layers and uses never share a stream."""
        return generator(self.seed, purpose, self.layer)

    def stream_seed(self, purpose: str) -> int:
        return derive(self.seed, purpose, self.layer)


def equal_sizes(count: int, parts: int) -> list[int]:
    """`parts` sizes summing to `count` that differ by at most one (larger first)."""
    return [count // parts + (1 if j < count % parts else 0) for j in range(parts)]


def neuron_norm_score(inputs: LayerInputs) -> np.ndarray:
    """||down column i|| * ||up row i||: how much neuron i can move the output, from weights alone."""
    up, down = inputs.weight("up"), inputs.weight("down")
    return np.linalg.norm(down, axis=0) * np.linalg.norm(up, axis=1)


def top_indices(score: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` largest scores (ties: lower index first), sorted ascending."""
    order = np.lexsort((np.arange(len(score)), -score))
    return np.sort(order[:count])


def split_shared(inputs: LayerInputs, score: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(shared, rest): the `shared_count` best neurons by `score` (default: the weight-norm score)."""
    if inputs.shared_count == 0:
        return np.zeros(0, dtype=np.int64), np.arange(inputs.ffn)
    score = neuron_norm_score(inputs) if score is None else score
    shared = top_indices(score, inputs.shared_count)
    return shared, np.setdiff1d(np.arange(inputs.ffn), shared)


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row at unit length (a zero row stays zero)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)
