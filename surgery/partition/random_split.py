"""`random` (LLaMA-MoE "Independent Random"): shuffle the neurons, cut into N equal parts."""

from __future__ import annotations

import numpy as np

from surgery.partition.base import LayerInputs, Partition, equal_sizes, split_shared

NAME = "random"
NEEDS: frozenset = frozenset()


def split(inputs: LayerInputs) -> Partition:
    shared, rest = split_shared(inputs)
    shuffled = inputs.rng("random").permutation(rest)
    bounds = np.cumsum([0] + equal_sizes(len(rest), inputs.num_experts))
    experts = [np.sort(shuffled[bounds[j]:bounds[j + 1]]) for j in range(inputs.num_experts)]
    return Partition(experts, shared)
