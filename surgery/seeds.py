"""The one seed rule: every random draw of every operation comes from ``derive(seed, purpose, ...)``.

A draw is named by the user's ``--seed``, a purpose (``"router"``, ``"drop_neurons"``, ``"kmeans"``
...) and the indices that make it unique (layer, expert ...). The name is hashed by numpy's
``SeedSequence``, so streams never overlap, do not depend on the order in which tensors are
computed, and are stable across runs, platforms and versions.
"""

from __future__ import annotations

import zlib

import numpy as np


def derive(seed: int, purpose: str, *indices: int) -> int:
    """A 63-bit seed for the stream (seed, purpose, indices...)."""
    if int(seed) < 0:
        raise ValueError(f"seed {seed} must be non-negative")
    entropy = [int(seed), zlib.crc32(purpose.encode("utf-8")), *(int(index) for index in indices)]
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def router_seed(seed: int, layer: int) -> int:
    """The seed of one layer's data-free router rows (normal / uniform), in every operation."""
    return derive(seed, "router", layer)


def generator(seed: int, purpose: str, *indices: int):
    """A numpy Generator for the stream (seed, purpose, indices...)."""
    return np.random.default_rng(derive(seed, purpose, *indices))


def sklearn_state(seed: int, purpose: str, *indices: int) -> int:
    """The stream's seed as scikit-learn's ``random_state`` (it accepts 32 bits)."""
    return derive(seed, purpose, *indices) % 2**32
