"""Router rows for split experts, without training.

* ``centroid`` (MoEfication's similarity router): expert j's row is the mean of the L2-normalised
  gate_proj rows of its routed neurons, so its logit is the expert's mean gate direction . x.
* ``calibrated``: rows fitted on calibration tokens at the router's real input (the post-attention
  norm output) so that the experts with the largest activation mass sum|h_i| get the largest
  logits: ridge least squares onto the per-token standardised masses. (Softmax regression towards
  the oracle top-k set, log or rank targets and other ridge strengths picked the same experts on
  held-out tokens within half a point on the demo model, so the closed form stays.)

Both are rescaled so that logits spread by about ``LOGIT_STD`` across experts: the selection
(top-k) does not depend on a positive scale, but the renormalised top-k weights do, and on the
demo model nearly even weights over the selected experts lost least (std 0.1 < 0.3 < 1 < 3 < 10;
see docs/split.md).
"""

from __future__ import annotations

import numpy as np

from surgery.partition.balanced import normalize_rows
from surgery.partition.base import Partition

LOGIT_STD = 0.1
RIDGE = 1e-2  # times the mean diagonal of X^T X


def centroid_router(gate: np.ndarray, partition: Partition) -> np.ndarray:
    """[experts, hidden]: mean L2-normalised gate row of each expert's neurons, scaled to unit-ish logits."""
    rows = normalize_rows(np.asarray(gate, dtype=np.float32))
    router = np.stack([rows[expert].mean(axis=0) for expert in partition.experts])
    # Router inputs are RMS-normalised (entries of size ~1, norm ~sqrt(hidden)): centre the rows so
    # that a direction common to every expert adds nothing, and scale the spread to LOGIT_STD.
    router = router - router.mean(axis=0, keepdims=True)
    spread = np.sqrt(np.mean(np.sum(router ** 2, axis=1)))  # logit std for a unit-variance input
    return (router * (LOGIT_STD / max(spread, 1e-12))).astype(np.float32)


def standardized(masses: np.ndarray) -> np.ndarray:
    """Per token: (mass - mean over experts) / std over experts; the ranking is unchanged."""
    centred = masses - masses.mean(axis=1, keepdims=True)
    return centred / np.maximum(centred.std(axis=1, keepdims=True), 1e-12)


def calibrated_router(inputs, masses) -> np.ndarray:
    """[experts, hidden] fitted so that x . row_j ranks experts like their activation mass on x."""
    x = np.asarray(inputs, dtype=np.float64)
    target = standardized(np.asarray(masses, dtype=np.float64))
    gram = x.T @ x
    ridge = RIDGE * np.trace(gram) / len(gram)
    weights = np.linalg.solve(gram + ridge * np.eye(len(gram)), x.T @ target)  # [hidden, experts]
    logits = x @ weights
    weights *= LOGIT_STD / max(float(logits.std(axis=1).mean()), 1e-12)
    return weights.T.astype(np.float32)


def oracle_hit_rate(inputs, masses, router: np.ndarray, top_k: int) -> float:
    """Fraction of the top-k-by-mass experts that the router's top-k also selects."""
    logits = np.asarray(inputs, dtype=np.float64) @ np.asarray(router, dtype=np.float64).T
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    best = np.argsort(-np.asarray(masses), axis=1, kind="stable")[:, :top_k]
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(chosen, best))
    return hits / (len(chosen) * top_k)
