"""`coactivation` (MoEfication): neurons that fire together belong together.

A neuron fires on a calibration token when |h| is above the layer's quantile (h = input of
down_proj). The co-activation graph counts, for each neuron pair, the tokens on which both fire;
it is cut into N balanced parts by spectral embedding (top-N eigenvectors of the degree-normalised
graph, rows L2-normalised) followed by balanced k-means on that embedding.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse.linalg import eigsh

from surgery.partition.balanced import balanced_kmeans
from surgery.partition.base import LayerInputs, Partition, equal_sizes, split_shared

NAME = "coactivation"
NEEDS = frozenset({"firing"})
TOKEN_CHUNK = 4096


def coactivation_counts(firing: np.ndarray, ffn: int, neurons: np.ndarray) -> np.ndarray:
    """[len(neurons), len(neurons)]: tokens on which both neurons fire (diagonal: on which each fires).

    float32 holds counts exactly up to 2**24 tokens."""
    counts = np.zeros((len(neurons), len(neurons)), dtype=np.float32)
    for start in range(0, len(firing), TOKEN_CHUNK):
        bits = np.unpackbits(firing[start:start + TOKEN_CHUNK], axis=1, count=ffn)[:, neurons].astype(np.float32)
        counts += bits.T @ bits
    return counts


def spectral_embedding(counts: np.ndarray, dimensions: int) -> np.ndarray:
    """Top eigenvectors of D^-1/2 A D^-1/2 (A = co-activation counts), rows L2-normalised."""
    degree = np.maximum(counts.sum(axis=1, dtype=np.float64), 1.0).astype(np.float32)
    scale = 1.0 / np.sqrt(degree)
    normalized = counts * scale[:, None] * scale[None, :]
    dimensions = min(dimensions, len(counts))
    if len(counts) <= 2048:
        _, vectors = np.linalg.eigh(normalized)
        vectors = vectors[:, -dimensions:]
    else:
        _, vectors = eigsh(normalized, k=dimensions, which="LA", v0=np.ones(len(counts)))
    vectors = vectors * np.sign(vectors.sum(axis=0) + 1e-30)  # fix each eigenvector's sign
    return vectors


def split(inputs: LayerInputs) -> Partition:
    shared, rest = split_shared(inputs, score=_firing_rate(inputs))
    counts = coactivation_counts(inputs.firing, inputs.ffn, rest)
    embedding = spectral_embedding(counts, inputs.num_experts)
    labels, _, stats = balanced_kmeans(embedding, inputs.num_experts, seed=inputs.stream_seed("coactivation"),
                                       capacities=equal_sizes(len(rest), inputs.num_experts))
    within = 0.0
    for j in range(inputs.num_experts):
        block = counts[np.ix_(labels == j, labels == j)]
        within += float(block.sum(dtype=np.float64) - np.trace(block))
    total = float(counts.sum(dtype=np.float64) - np.trace(counts))
    return Partition([rest[labels == j] for j in range(inputs.num_experts)], shared,
                     {"coactivation_within_experts": round(float(within / max(total, 1e-30)), 4)})


def _firing_rate(inputs: LayerInputs) -> np.ndarray:
    """How often each neuron fires: with --shared-neurons, the most active neurons are shared."""
    rate = np.zeros(inputs.ffn, dtype=np.float64)
    for start in range(0, len(inputs.firing), TOKEN_CHUNK):
        rate += np.unpackbits(inputs.firing[start:start + TOKEN_CHUNK], axis=1, count=inputs.ffn).sum(axis=0)
    return rate
