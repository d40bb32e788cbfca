"""Diversity for upcycled experts: noise upcycling and Drop-Upcycling, as pure tensor functions.

Identical experts receive identical gradients only through different routing; these transforms
make them differ from step one, and so break exactness on purpose. Both work on *neurons*: neuron
i of an expert is row i of its gate and up projections and column i of its down projection, and
the same neuron indices are used in all three matrices.

- noise upcycling: add N(0, sigma * std(W)) to the chosen neurons of W;
- Drop-Upcycling (Nakamura et al., ICLR 2025): replace the chosen neurons of W by fresh draws from
  N(mean(W), std(W)) of the original matrix.

``ExpertDiversity`` applies both to one expert matrix of an upcycle; ``FfnNoise`` is noise on every neuron
of one FFN matrix (a mergekit-moe ``noise_scale``), the same mechanism.

Every random draw comes from a generator seeded by (seed, layer, expert, stream), so the result
does not depend on the order tensors are computed in, and the same seed gives the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from surgery.seeds import derive

# Independent random streams per (layer, expert): the neuron choice of each transform and the
# values drawn for each of the three matrices (purposes of surgery.seeds.derive).
STREAMS = ("drop_neurons", "noise_neurons", "drop_gate", "drop_up", "drop_down", "noise_gate", "noise_up", "noise_down")


def stream_seed(seed: int, layer: int, expert: int, stream: str) -> int:
    """A 63-bit seed for one (layer, expert, stream), stable across runs, platforms and versions."""
    if stream not in STREAMS:
        raise KeyError(stream)
    return derive(seed, stream, layer, expert)


def neuron_count(size: int, fraction: float) -> int:
    """How many of `size` neurons a fraction selects: round half up, so 0.5 of 11 is 6."""
    return min(size, int(math.floor(fraction * size + 0.5)))


def choose_neurons(size: int, fraction: float, seed: int) -> list[int]:
    """A sorted random subset of range(size) holding neuron_count(size, fraction) indices."""
    import torch  # lazy: plans are built without torch; only computing a tensor needs it

    count = neuron_count(size, fraction)
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:count].tolist())


def _select(weight, indices, axis: int):
    import torch  # lazy: plans are built without torch; only computing a tensor needs it

    index = torch.as_tensor(list(indices), dtype=torch.long)
    return index, weight.index_select(axis, index)


def _draw(shape, seed: int):
    import torch  # lazy: plans are built without torch; only computing a tensor needs it

    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def drop_reinit(weight, indices, axis: int, mean: float, std: float, seed: int):
    """A copy of `weight` whose neurons `indices` (rows if axis 0, columns if axis 1) are N(mean, std)."""
    if not len(indices):
        return weight
    index, chosen = _select(weight, indices, axis)
    fresh = (_draw(chosen.shape, seed) * std + mean).to(weight.dtype)
    out = weight.clone()
    out.index_copy_(axis, index, fresh)
    return out


def add_noise(weight, indices, axis: int, std: float, seed: int):
    """A copy of `weight` with N(0, std) added to its neurons `indices` (computed in float32)."""
    if not len(indices) or std == 0:
        return weight
    index, chosen = _select(weight, indices, axis)
    noisy = (chosen.float() + _draw(chosen.shape, seed) * std).to(weight.dtype)
    out = weight.clone()
    out.index_copy_(axis, index, noisy)
    return out


def matrix_stats(weight, block_elements: int = 1 << 22) -> tuple[float, float]:
    """(mean, std) of a matrix, accumulated in float64 over row blocks (two passes, bounded memory)."""
    import torch  # lazy: plans are built without torch; only computing a tensor needs it

    rows = weight.reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.reshape(1, -1)
    count = rows.numel()
    if count < 2:
        return (float(rows.double().sum()) if count else 0.0), 0.0
    step = max(1, block_elements // max(1, rows.shape[1]))
    blocks = [(start, start + step) for start in range(0, rows.shape[0], step)]
    mean = sum(float(rows[a:b].to(torch.float64).sum()) for a, b in blocks) / count
    squares = sum(float((rows[a:b].to(torch.float64) - mean).square().sum()) for a, b in blocks)
    return mean, (squares / (count - 1)) ** 0.5


@dataclass
class ExpertDiversity:
    """Drop-Upcycling then noise on one expert matrix; neuron i is row i (gate, up) or column i (down)."""

    seeds: dict
    axis: int
    drop: list
    noise: list
    sigma: float
    stats: object = None  # () -> (mean, std) of the original matrix; None: those of the input itself

    def describe(self) -> str:
        parts = []
        if self.drop:
            parts.append(f"drop-upcycle {len(self.drop)} neurons")
        if self.noise and self.sigma > 0:
            parts.append(f"noise {self.sigma:g}*std on {len(self.noise)} neurons")
        return " + ".join(parts) or "unchanged"

    def __call__(self, weight):
        mean, std = self.stats() if self.stats else matrix_stats(weight)
        if self.drop:
            weight = drop_reinit(weight, self.drop, self.axis, mean, std, self.seeds["drop"])
        if self.noise and self.sigma > 0:
            weight = add_noise(weight, self.noise, self.axis, self.sigma * std, self.seeds["noise"])
        return weight


@dataclass
class FfnNoise:
    """N(0, std) added to every weight of one FFN matrix (mergekit-moe's noise_scale): ``add_noise`` on every
    neuron, a seeded stream per layer, expert and matrix."""

    std: float
    axis: int  # the neuron axis: rows of gate/up, columns of down
    seed: int

    def describe(self) -> str:
        return f"noise N(0, {self.std:g})"

    def __call__(self, weight):
        return add_noise(weight, range(weight.shape[self.axis]), self.axis, self.std, self.seed)
