"""Router rows that read no data: zero, normal(0, std), uniform(+-1/sqrt(hidden)), seeded per layer.

They are plan nodes (``Init``): known from headers, computed with numpy by the writer when it writes them, so
a dry run reads nothing and a float32 upcycle or merge never imports torch.
"""

from __future__ import annotations

from surgery.execution.routers.request import Fitted, RouterRequest
from surgery.plan.nodes import Init


def node(kind: str, request: RouterRequest) -> Init:
    """The plan node of `kind` (zero, normal, uniform) rows for `request`."""
    return Init(kind, (request.rows, request.hidden), seed=request.seed, std=request.std)


def zero(request: RouterRequest) -> Fitted:
    return Fitted(node("zero", request).compute())


def normal(request: RouterRequest) -> Fitted:
    return Fitted(node("normal", request).compute())


def uniform(request: RouterRequest) -> Fitted:
    return Fitted(node("uniform", request).compute())
