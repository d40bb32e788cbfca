"""The per-layer arguments recorded for each batch (masks, position embeddings), kept and cut to size.

``shared`` replaces tensors equal to ones the previous batch already keeps (they repeat from batch to
batch), so the recorded calls cost memory once; ``rows_of`` cuts a call's arguments to a chunk of the
batch's rows, leaving tensors that broadcast over rows whole.
"""

from __future__ import annotations

import torch


def rows_of(value, part: slice, rows: int):
    """`value` with every tensor whose first dimension is the batch's rows cut to `part` (masks); other
    tensors (rotary embeddings, broadcast over rows) are kept whole."""
    if isinstance(value, torch.Tensor):
        return value[part] if value.dim() and value.shape[0] == rows and rows > 1 else value
    if isinstance(value, tuple):
        return tuple(rows_of(item, part, rows) for item in value)
    if isinstance(value, dict):
        return {key: rows_of(item, part, rows) for key, item in value.items()}
    return value


def shared(calls: list, earlier: list) -> list:
    """The batch's per-layer arguments, with tensors equal to ones already kept replaced by those
    (position embeddings and masks repeat from batch to batch)."""
    pool = {}
    for previous in earlier[-1:]:
        for args, kwargs in previous:
            for value in _tensors(args, kwargs):
                pool.setdefault((tuple(value.shape), value.dtype), []).append(value)

    def share(value):
        if isinstance(value, torch.Tensor):
            for candidate in pool.get((tuple(value.shape), value.dtype), []):
                if candidate is value or torch.equal(candidate, value):
                    return candidate
            return value
        if isinstance(value, tuple):
            return tuple(share(item) for item in value)
        return value

    return [(tuple(share(a) for a in args), {k: share(v) for k, v in kwargs.items()}) for args, kwargs in calls]


def _tensors(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if isinstance(item, torch.Tensor):
                yield item
