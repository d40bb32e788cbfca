"""``ridge`` (split's calibrated router): expert j holds a set of the dense FFN's neurons, so the experts that
hold most of a token's activation should get its largest logits.

Least squares (with a small ridge) from the router inputs onto the per-token standardised activation masses
(``targets``: [tokens, experts], each expert's sum of |h| over its neurons); the logits then spread by
``LOGIT_STD`` across experts (nearly even top-k weights lost least, docs/split.md).
"""

from __future__ import annotations

import numpy as np

from surgery.execution.routers.request import LOGIT_STD, Fitted, RouterRequest

RIDGE = 1e-2  # times the mean diagonal of X^T X


def standardized(masses):
    """Per token: (mass - mean over experts) / std over experts; the ranking is unchanged."""
    centred = masses - masses.mean(axis=1, keepdims=True)
    return centred / np.maximum(centred.std(axis=1, keepdims=True), 1e-12)


def ridge(request: RouterRequest) -> Fitted:
    import torch  # lazy: the router registry is read by plans that never compute (plain upcycles)

    x = torch.as_tensor(request.inputs).float().double().numpy()
    target = standardized(torch.as_tensor(request.targets).double().numpy())
    gram = x.T @ x
    weights = np.linalg.solve(gram + RIDGE * np.trace(gram) / len(gram) * np.eye(len(gram)), x.T @ target)
    logits = x @ weights  # [tokens, experts]
    weights *= LOGIT_STD / max(float(logits.std(axis=1).mean()), 1e-12)
    return Fitted(torch.from_numpy(weights.T.astype(np.float32)))
