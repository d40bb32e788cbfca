"""`sharing-inner` (LLaMA-MoE): expert j = the top-m neurons by importance on calibration cluster j
(m = the routed neurons / N); experts may overlap. Neurons that no cluster ranks in its top-m are
then handed out, evenly over the experts, to the cluster that rates them highest, so every neuron
is held by at least one expert (the split stays exact at k = N)."""

from __future__ import annotations

import numpy as np

from surgery.partition.balanced import balanced_assign
from surgery.partition.base import LayerInputs, Partition, equal_sizes, split_shared, top_indices

NAME = "sharing-inner"
NEEDS = frozenset({"importance"})


def relative_importance(importance: np.ndarray) -> np.ndarray:
    """Each cluster's scores divided by its mean, so clusters with larger gradients do not dominate."""
    return importance / np.maximum(importance.mean(axis=1, keepdims=True), 1e-30)


def split(inputs: LayerInputs) -> Partition:
    importance = relative_importance(inputs.importance)
    shared, rest = split_shared(inputs, score=importance.mean(axis=0))
    size = -(-len(rest) // inputs.num_experts)
    experts = [rest[top_indices(importance[j, rest], size)] for j in range(inputs.num_experts)]
    held = np.zeros(inputs.ffn, dtype=bool)
    for expert in experts:
        held[expert] = True
    uncovered = rest[~held[rest]]
    if len(uncovered):
        labels = balanced_assign(importance[:, uncovered].T, equal_sizes(len(uncovered), inputs.num_experts))
        experts = [np.sort(np.concatenate([experts[j], uncovered[labels == j]])) for j in range(inputs.num_experts)]
    holders = np.zeros(inputs.ffn, dtype=np.int64)
    for expert in experts:
        holders[expert] += 1
    stats = {"neurons_in_several_experts": int(np.sum(holders > 1)), "filled_uncovered": int(len(uncovered))}
    return Partition(experts, shared, stats)
