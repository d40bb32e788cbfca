"""Routers for experts trained on domains (merge): each domain's tokens should go to its own expert.

* ``class-mean``: centred class-mean directions of the router inputs (``targets``: the row each token should
  go to), with one scale fitted by cross-entropy;
* ``logistic``: multinomial logistic regression from there (L-BFGS); rows without tokens stay zero;
* ``embedding``: the centred, unit-length class means themselves, of vectors that need no model run (the
  input embedding rows of each domain's tokens: mergekit's ``cheap_embed``);
* ``sigmoid-gate``: one gate row (a shared expert's sigmoid gate) from a two-row classifier (``via``) of the
  tokens it should open on (``targets`` 1) against the others: softmax over two rows is the sigmoid of their
  difference.

``negatives`` add the loss of sending a token to a row it should avoid (-log(1 - p)) to class-mean and
logistic, and are subtracted from the class mean by ``embedding``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

from surgery.execution.routers.request import Fitted, RouterRequest

SMALL_FIT_ELEMENTS = 2**20  # activations below this many numbers are fitted on one thread (measured: 6M numbers fit 4x faster on 2)
LOGISTIC_STEPS, LOGISTIC_L2 = 50, 1e-4


def class_mean(request: RouterRequest) -> Fitted:
    return Fitted(_fit(request, "class-mean"))


def logistic(request: RouterRequest) -> Fitted:
    return Fitted(_fit(request, "logistic"))


def embedding(request: RouterRequest) -> Fitted:
    """Centred unit class means of `inputs` (grouped by label), minus each row's negative mean."""
    import torch  # lazy: the router registry is read by plans that never compute (plain upcycles)

    inputs = torch.as_tensor(request.inputs).float()
    means = {label: rows.mean(0) for label, rows in label_groups(inputs, torch.as_tensor(request.targets)).items()}
    if request.negatives is not None:
        negative, owners = torch.as_tensor(request.negatives[0]).float(), torch.as_tensor(request.negatives[1])
        for owner, rows in label_groups(negative, owners).items():
            means[owner] = means[owner] - rows.mean(0)
    return Fitted(centred_unit_rows(means, request.rows, request.hidden))


def sigmoid_gate(request: RouterRequest) -> Fitted:
    """[1, hidden]: a sigmoid gate that opens on the tokens labelled 1."""
    pair = _fit(replace(request, rows=2), request.via)
    return Fitted((pair[1] - pair[0]).unsqueeze(0))


def _fit(request: RouterRequest, method: str):
    import torch  # lazy: as above

    inputs = torch.as_tensor(request.inputs).float()
    labels = torch.as_tensor(request.targets, dtype=torch.long)
    if bool((labels[1:] < labels[:-1]).any()):  # grouped by label once (a copy only when not already)
        order = torch.argsort(labels, stable=True)
        inputs, labels = inputs[order], labels[order]
    with _threads_for(int(inputs.numel())):
        return _classifier(inputs, labels, request.rows, method, request.options.get("steps", LOGISTIC_STEPS),
                           request.options.get("l2", LOGISTIC_L2), request.negatives)


def centred_unit_rows(means: dict, num_experts: int, hidden: int):
    """[E, H]: each mean minus the mean of means, at unit length (zero rows for experts without one)."""
    import torch  # lazy: the router registry is read by plans that never compute (plain upcycles)

    rows = torch.zeros(num_experts, hidden)
    centre = torch.stack(list(means.values())).mean(0)
    for expert, mean in means.items():
        direction = mean - centre if len(means) > 1 else mean
        rows[expert] = direction / direction.norm().clamp_min(1e-12)
    return rows


@contextmanager
def _threads_for(elements: int):
    """One thread for small fits: thousands of tiny ops cost more in thread hand-offs than they save."""
    import torch  # lazy: as above

    previous = torch.get_num_threads()
    if elements < SMALL_FIT_ELEMENTS:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def label_groups(inputs, labels) -> dict:
    """{label: the rows of `inputs` with that label} as views, for inputs grouped by label."""
    import torch  # lazy: as above

    values, counts = torch.unique_consecutive(labels, return_counts=True)
    starts = [0] + counts.cumsum(0).tolist()
    return {int(value): inputs[start:end] for value, start, end in zip(values.tolist(), starts, starts[1:])}


def _classifier(features, labels, num_experts: int, method: str, steps: int, l2: float, negatives=None):
    import torch  # lazy: as above

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
    import torch  # lazy: as above

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
