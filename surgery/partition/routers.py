"""The data-free router of split experts: MoEfication's similarity router (``--router-init centroid``).

Expert j's row is the mean of the L2-normalised gate_proj rows of its routed neurons, so its
logit is the expert's mean gate direction . x; rows are centred and scaled so that logits spread
by ``LOGIT_STD`` across experts, like the calibrated router's (``surgery.execution.routers``).
"""

from __future__ import annotations

import numpy as np

from surgery.execution.routers import LOGIT_STD
from surgery.partition.balanced import normalize_rows
from surgery.partition.base import Partition


def centroid_router(gate: np.ndarray, partition: Partition) -> np.ndarray:
    """[experts, hidden]: mean L2-normalised gate row of each expert's neurons, scaled to unit-ish logits."""
    rows = normalize_rows(np.asarray(gate, dtype=np.float32))
    router = np.stack([rows[expert].mean(axis=0) for expert in partition.experts])
    # Router inputs are RMS-normalised (entries of size ~1, norm ~sqrt(hidden)): centre the rows so
    # that a direction common to every expert adds nothing, and scale the spread to LOGIT_STD.
    router = router - router.mean(axis=0, keepdims=True)
    spread = np.sqrt(np.mean(np.sum(router ** 2, axis=1)))  # logit std for a unit-variance input
    return (router * (LOGIT_STD / max(spread, 1e-12))).astype(np.float32)
