"""`sharing-inter` (LLaMA-MoE): neurons that rank high for most calibration clusters become the
shared part (median percentile rank over clusters, ties by mean relative importance); the rest are
split evenly among the routed experts, expert j taking the neurons cluster j rates highest."""

from __future__ import annotations

import numpy as np

from surgery.partition.balanced import balanced_assign
from surgery.partition.base import LayerInputs, Partition, equal_sizes, split_shared
from surgery.partition.sharing_inner import relative_importance

NAME = "sharing-inter"
NEEDS = frozenset({"importance"})
DEFAULT_SHARED = True


def breadth(importance: np.ndarray) -> np.ndarray:
    """Median over clusters of each neuron's percentile rank, plus a tie-break below one rank step."""
    ffn = importance.shape[1]
    ranks = np.argsort(np.argsort(importance, axis=1, kind="stable"), axis=1, kind="stable") / max(ffn - 1, 1)
    mean = importance.mean(axis=0)
    return np.median(ranks, axis=0) + 0.5 / max(ffn, 1) * mean / max(mean.max(), 1e-30)


def split(inputs: LayerInputs) -> Partition:
    importance = relative_importance(inputs.importance)
    shared, rest = split_shared(inputs, score=breadth(importance))
    labels = balanced_assign(importance[:, rest].T, equal_sizes(len(rest), inputs.num_experts))
    return Partition([rest[labels == j] for j in range(inputs.num_experts)], shared)
