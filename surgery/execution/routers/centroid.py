"""``centroid`` (split's data-free router, MoEfication's similarity router): each row is the mean of a group
of vectors, read from the weights, not from a model run.

``inputs`` are the L2-normalised gate_proj rows of a dense FFN and ``targets`` each expert's neurons: expert
j's logit is then its mean gate direction . x. Router inputs are RMS-normalised (entries of size ~1, norm
~sqrt(hidden)): the rows are centred, so that a direction common to every expert adds nothing, and scaled so
that the logits spread by ``LOGIT_STD`` across experts, like the ridge router's.
"""

from __future__ import annotations

import numpy as np

from surgery.execution.routers.request import LOGIT_STD, Fitted, RouterRequest


def centroid(request: RouterRequest) -> Fitted:
    import torch  # lazy: the router registry is read by plans that never compute (plain upcycles)

    vectors = np.asarray(request.inputs, dtype=np.float32)
    router = np.stack([vectors[group].mean(axis=0) for group in request.targets])
    router = router - router.mean(axis=0, keepdims=True)
    spread = np.sqrt(np.mean(np.sum(router ** 2, axis=1)))  # logit std for a unit-variance input
    return Fitted(torch.from_numpy((router * (LOGIT_STD / max(spread, 1e-12))).astype(np.float32)))
