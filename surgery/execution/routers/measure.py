"""Measuring a router on router inputs: the MoE block's weights, each group's mean weights, hits against an
oracle. (How many top-k slots each expert takes is a routing statistic: ``execution.routing_stats``.)"""

from __future__ import annotations

import numpy as np


def routing_weights(inputs, rows, top_k: int):
    """[tokens, E]: the MoE block's weights (softmax over all experts, top-k kept and renormalised)."""
    import torch  # lazy: the router registry is read by plans that never compute (plain upcycles)

    probabilities = torch.softmax(torch.as_tensor(inputs).float() @ torch.as_tensor(rows).float().T, dim=-1)
    top = torch.topk(probabilities, top_k, dim=-1)
    return torch.zeros_like(probabilities).scatter_(1, top.indices, top.values / top.values.sum(-1, keepdim=True))


def routing_shares(groups: dict, rows, top_k: int):
    """[groups, E]: mean routing weight each expert gets on each group's tokens (rows sum to 1)."""
    import torch  # lazy: as above

    return torch.stack([routing_weights(groups[key], rows, top_k).mean(0) for key in sorted(groups)])


def oracle_hit_rate(inputs, masses, rows, top_k: int) -> float:
    """Fraction of the top-k-by-mass experts that the router's top-k also selects."""
    logits = np.asarray(inputs, dtype=np.float64) @ np.asarray(rows, dtype=np.float64).T
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    best = np.argsort(-np.asarray(masses), axis=1, kind="stable")[:, :top_k]
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(chosen, best))
    return hits / (len(chosen) * top_k)
