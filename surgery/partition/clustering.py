"""`clustering` (LLaMA-MoE "Independent Clustering"): balanced k-means on the L2-normalised rows
of up_proj (default), gate_proj, or both concatenated; every expert gets exactly its share."""

from __future__ import annotations

import numpy as np

from surgery.partition.balanced import balanced_kmeans
from surgery.partition.base import LayerInputs, Partition, equal_sizes, normalize_rows, split_shared

NAME = "clustering"
NEEDS: frozenset = frozenset()
CLUSTER_ON = ("up", "gate", "gate+up")


def features(inputs: LayerInputs) -> np.ndarray:
    """The row each neuron is clustered by (unit length)."""
    roles = inputs.cluster_on.split("+")
    parts = [normalize_rows(inputs.weight(role)) for role in roles]
    return normalize_rows(np.concatenate(parts, axis=1)) if len(parts) > 1 else parts[0]


def split(inputs: LayerInputs) -> Partition:
    shared, rest = split_shared(inputs)
    points = features(inputs)[rest]
    labels, _, stats = balanced_kmeans(points, inputs.num_experts, seed=inputs.stream_seed("clustering"),
                                       capacities=equal_sizes(len(rest), inputs.num_experts))
    experts = [rest[labels == j] for j in range(inputs.num_experts)]
    return Partition(experts, shared, stats)
