"""Router rows fitted on calibration tokens: one entry point, ``fit_router(method, inputs, ...)``.

`inputs` are a layer's router inputs on real calibration tokens ([tokens, hidden], what the
router reads: see ``Family.router_input``). The methods differ in what a good router is:

* ``kmeans`` (upcycle: identical experts, nothing to predict): k-means of the L2-normalised
  inputs, one unit centroid per row, times ``scale`` (the norm of a normal(0, std) row), so that
  each expert is preferred by one region of the input space;
* ``ridge`` (split: expert j holds a set of neurons): least squares onto the per-token
  standardised activation masses ``targets`` [tokens, experts], so the experts holding most of
  the activation get the largest logits; logits then spread by ``LOGIT_STD``;
* ``class-mean`` / ``logistic`` (merge: expert j was trained on domain j): centred class-mean
  directions with one scale fitted by cross-entropy, then (logistic) multinomial logistic
  regression from there, sending each domain's tokens (``targets``: domain per token) to its
  expert; experts without tokens keep a zero row. ``negatives`` add the loss of sending a token
  to an expert it should avoid (-log(1 - p)), in both fits.

The helpers below measure a router on the same inputs (load per expert, routing shares).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

from surgery.errors import SurgeryError

METHODS = ("kmeans", "ridge", "class-mean", "logistic")
LOGIT_STD = 0.1  # ridge: spread of the logits across experts (nearly even top-k weights lost least; docs/split.md)
RIDGE = 1e-2  # times the mean diagonal of X^T X
SMALL_FIT_ELEMENTS = 2**20  # activations below this many numbers are fitted on one thread (measured: 6M numbers fit 4x faster on 2)


def fit_router(method: str, inputs, *, rows: int, targets=None, seed: int = 0, scale: float = 1.0, steps: int = 50,
               l2: float = 1e-4, negatives=None):
    """FloatTensor [rows, hidden] fitted by `method` (see the module doc). `negatives` (class-mean / logistic):
    (inputs, experts): tokens that expert experts[i] should not receive (mergekit's negative prompts)."""
    import torch

    inputs = torch.as_tensor(inputs).float()
    if method == "kmeans":
        return _kmeans(inputs, rows, seed, scale)
    if method == "ridge":
        return torch.from_numpy(_ridge(inputs.double().numpy(), torch.as_tensor(targets).double().numpy()))
    if method in ("class-mean", "logistic"):
        labels = torch.as_tensor(targets, dtype=torch.long)
        if bool((labels[1:] < labels[:-1]).any()):  # grouped by label once (a copy only when not already)
            order = torch.argsort(labels, stable=True)
            inputs, labels = inputs[order], labels[order]
        with _threads_for(int(inputs.numel())):
            return _classifier(inputs, labels, rows, method, steps, l2, negatives)
    raise SurgeryError(f"router fit {method!r} is not one of {', '.join(METHODS)}")


# ------------------------------------------------------------------ kmeans
def _kmeans(inputs, rows: int, seed: int, scale: float):
    import warnings

    import numpy as np
    import torch
    from sklearn.cluster import KMeans

    if inputs.shape[0] < rows:
        raise SurgeryError(f"calibration gave {inputs.shape[0]} tokens, fewer than the {rows} router rows to fit; "
                           "use a longer --calibration file")
    points = torch.nn.functional.normalize(inputs.double(), dim=1).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate points: sklearn warns and still returns `rows` centroids
        kmeans = KMeans(n_clusters=rows, n_init=4, random_state=seed % 2**32).fit(points)
    centroids = torch.nn.functional.normalize(torch.from_numpy(np.asarray(kmeans.cluster_centers_)), dim=1)
    return (centroids * scale).float().contiguous()


# ------------------------------------------------------------------ ridge
def standardized(masses):
    """Per token: (mass - mean over experts) / std over experts; the ranking is unchanged."""
    import numpy as np

    centred = masses - masses.mean(axis=1, keepdims=True)
    return centred / np.maximum(centred.std(axis=1, keepdims=True), 1e-12)


def _ridge(x, masses):
    import numpy as np

    target = standardized(masses)
    gram = x.T @ x
    ridge = RIDGE * np.trace(gram) / len(gram)
    weights = np.linalg.solve(gram + ridge * np.eye(len(gram)), x.T @ target)  # [hidden, experts]
    logits = x @ weights
    weights *= LOGIT_STD / max(float(logits.std(axis=1).mean()), 1e-12)
    return weights.T.astype(np.float32)


# ------------------------------------------------------------------ class-mean / logistic
def centred_unit_rows(means: dict, num_experts: int, hidden: int):
    """[E, H]: each mean minus the mean of means, at unit length (zero rows for experts without one)."""
    import torch

    rows = torch.zeros(num_experts, hidden)
    centre = torch.stack(list(means.values())).mean(0)
    for expert, mean in means.items():
        direction = mean - centre if len(means) > 1 else mean
        rows[expert] = direction / direction.norm().clamp_min(1e-12)
    return rows


@contextmanager
def _threads_for(elements: int):
    """One thread for small fits: thousands of tiny ops cost more in thread hand-offs than they save."""
    import torch

    previous = torch.get_num_threads()
    if elements < SMALL_FIT_ELEMENTS:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def label_groups(inputs, labels) -> dict:
    """{label: the rows of `inputs` with that label} as views, for inputs grouped by label."""
    import torch

    values, counts = torch.unique_consecutive(labels, return_counts=True)
    starts = [0] + counts.cumsum(0).tolist()
    return {int(value): inputs[start:end] for value, start, end in zip(values.tolist(), starts, starts[1:])}


def _classifier(features, labels, num_experts: int, method: str, steps: int, l2: float, negatives=None):
    import torch

    groups = label_groups(features, labels)
    experts = sorted(groups)
    hidden = features.shape[1]
    direction = centred_unit_rows({e: groups[e].mean(0) for e in experts}, num_experts, hidden)
    weights = torch.cat([torch.full((len(groups[e]),), 1.0 / (len(groups[e]) * len(experts))) for e in experts])
    active = torch.zeros(num_experts, 1)
    active[experts] = 1.0
    avoid = _negative_term(negatives, num_experts, len(experts))

    def loss_of(rows):
        logits = features @ rows.T
        loss = (torch.nn.functional.cross_entropy(logits, labels, reduction="none") * weights).sum()
        return loss if avoid is None else loss + avoid(rows)

    scale = torch.zeros((), requires_grad=True)  # log of the scale of the class-mean rows
    optimizer = torch.optim.LBFGS([scale], lr=1, max_iter=30, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_of(direction * scale.exp())
        loss.backward()
        return loss

    optimizer.step(closure)
    rows = (direction * scale.detach().exp()).clone()
    if method == "class-mean":
        return rows
    rows.requires_grad_(True)
    optimizer = torch.optim.LBFGS([rows], lr=1, max_iter=steps, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure_rows():
        optimizer.zero_grad()
        masked = rows * active
        loss = loss_of(masked) + l2 * masked.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure_rows)
    return (rows.detach() * active).contiguous()


def _negative_term(negatives, num_experts: int, domains: int):
    """rows -> -sum_n w_n log(1 - p(expert_n | x_n)): the loss of routing token n to the expert it should avoid;
    each expert's negative tokens weigh as much in all as one domain's tokens do."""
    import torch

    if negatives is None or not len(negatives[1]):
        return None
    inputs, owners = torch.as_tensor(negatives[0]).float(), torch.as_tensor(negatives[1], dtype=torch.long)
    counts = torch.bincount(owners, minlength=num_experts).float()
    weights = 1.0 / (counts[owners] * domains)
    own = torch.nn.functional.one_hot(owners, num_experts).bool()

    def avoid(rows):
        logits = inputs @ rows.T
        others = torch.logsumexp(logits.masked_fill(own, float("-inf")), dim=-1)
        return -((others - torch.logsumexp(logits, dim=-1)) * weights).sum()

    return avoid


# ------------------------------------------------------------------ measuring a router
def routing_weights(inputs, rows, top_k: int):
    """[tokens, E]: the MoE block's weights (softmax over all experts, top-k kept and renormalised)."""
    import torch

    probabilities = torch.softmax(torch.as_tensor(inputs).float() @ torch.as_tensor(rows).float().T, dim=-1)
    top = torch.topk(probabilities, top_k, dim=-1)
    return torch.zeros_like(probabilities).scatter_(1, top.indices, top.values / top.values.sum(-1, keepdim=True))


def expert_load(inputs, rows, top_k: int):
    """Fraction of all top-k slots each expert receives on `inputs`."""
    import torch

    rows = torch.as_tensor(rows).float()
    chosen = torch.topk(torch.softmax(torch.as_tensor(inputs).float() @ rows.T, dim=-1), top_k, dim=-1).indices
    counts = torch.bincount(chosen.reshape(-1), minlength=rows.shape[0]).float()
    return counts / counts.sum()


def routing_shares(groups: dict, rows, top_k: int):
    """[groups, E]: mean routing weight each expert gets on each group's tokens (rows sum to 1)."""
    import torch

    return torch.stack([routing_weights(groups[key], rows, top_k).mean(0) for key in sorted(groups)])


def oracle_hit_rate(inputs, masses, rows, top_k: int) -> float:
    """Fraction of the top-k-by-mass experts that the router's top-k also selects."""
    import numpy as np

    logits = np.asarray(inputs, dtype=np.float64) @ np.asarray(rows, dtype=np.float64).T
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    best = np.argsort(-np.asarray(masses), axis=1, kind="stable")[:, :top_k]
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(chosen, best))
    return hits / (len(chosen) * top_k)


def router_norm(std: float, hidden: int) -> float:
    """Expected norm of a normal(0, std) router row: std * sqrt(hidden)."""
    return std * math.sqrt(hidden)
