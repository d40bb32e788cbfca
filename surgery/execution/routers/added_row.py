"""``added-row`` (add-experts): a row for a new expert beside a router's existing rows, one per text.

With m the mean router input of one text's tokens and u = m / ||m||, the text's row is c * u, where c is
MARGIN x the QUANTILE quantile, over the text's tokens x with u.x > 0, of (max existing logit at x) / (u.x):
the new row's logit exceeds every existing logit on about 90 % of those tokens (docs/add-experts.md).
``targets`` labels each token with its text (new rows in label order); ``existing`` holds the existing rows.
The facts say the share of each text's tokens its row wins over the existing rows.
"""

from __future__ import annotations

from surgery.execution.routers.request import Fitted, RouterRequest

QUANTILE, MARGIN = 0.9, 1.1


def added_row(request: RouterRequest) -> Fitted:
    import torch  # lazy: the router registry is read by plans that never compute (plain upcycles)

    inputs, labels = torch.as_tensor(request.inputs), torch.as_tensor(request.targets)
    existing = torch.as_tensor(request.existing)
    fitted = [_row(inputs[labels == label], existing) for label in torch.unique(labels).tolist()]
    return Fitted(torch.stack([row for row, _ in fitted]), {"wins": [share for _, share in fitted]})


def _row(inputs, existing) -> tuple:
    """(FloatTensor[hidden], share of the tokens it wins) for one text's router inputs."""
    import torch  # lazy: as above

    inputs, existing = inputs.double(), existing.double()
    best = (inputs @ existing.T).max(dim=-1).values
    mean = inputs.mean(dim=0)
    unit = mean / mean.norm().clamp_min(1e-12)
    projection = inputs @ unit
    positive = projection > 0
    scale = float(existing.norm(dim=-1).mean())
    if positive.any():
        quantile = float(torch.quantile(best[positive] / projection[positive], QUANTILE))
        if quantile > 0:
            scale = MARGIN * quantile
    return (scale * unit).float(), float((scale * projection > best).double().mean())
