"""What every router method receives and returns: ``RouterRequest`` and ``Fitted``.

A method makes the rows of one router (one row per expert, ``[rows, hidden]``) from what the request holds:
nothing but a seed (data-free inits), a layer's router inputs on calibration tokens (with targets: activation
masses, domain labels, existing rows ...), the embedding rows of calibration tokens, or weight rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOGIT_STD = 0.1  # spread of the logits across experts of the ridge and centroid routers (docs/split.md)


@dataclass(frozen=True)
class RouterRequest:
    rows: int  # router rows to make
    hidden: int  # the router's input size
    seed: int = 0  # data-free draws (a per-layer seed, ``seeds.router_seed``) and k-means
    std: float = 0.02  # normal rows' std; k-means rows get the norm of such a row
    inputs: object = None  # [tokens, hidden] router inputs (or the vectors a method averages), float32
    targets: object = None  # per method: activation masses [tokens, rows], row labels [tokens], row groups
    negatives: object = None  # (inputs, rows): tokens that row rows[i] should not take (mergekit's negative prompts)
    existing: object = None  # [experts, hidden]: the router's existing rows, for a row added beside them
    via: str | None = None  # the two-row classifier a sigmoid gate is fitted with
    options: dict = field(default_factory=dict)  # a method's own settings (logistic: steps, l2)


@dataclass
class Fitted:
    """A method's rows (float32 torch tensor [rows, hidden]) and what it measured while fitting them."""

    rows: object
    facts: dict = field(default_factory=dict)
