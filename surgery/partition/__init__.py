"""Split strategies: how one dense FFN's neurons are divided among N experts (and a shared part).

Every strategy is a small module with ``NAME``, ``NEEDS`` (the calibration statistics it uses:
``importance`` and/or ``firing``; empty for data-free strategies), optionally ``DEFAULT_SHARED``
(True: it makes a shared part even when the user does not size one) and
``split(inputs: LayerInputs) -> Partition``.
"""

from __future__ import annotations

import importlib

from surgery.errors import SurgeryError
from surgery.partition.base import LayerInputs, Partition

STRATEGIES = {
    "random": "surgery.partition.random_split",
    "clustering": "surgery.partition.clustering",
    "sharing-inner": "surgery.partition.sharing_inner",
    "sharing-inter": "surgery.partition.sharing_inter",
    "shared-norm": "surgery.partition.shared_norm",
    "coactivation": "surgery.partition.coactivation",
}


def strategy(name: str):
    """The module implementing strategy `name`; SurgeryError listing the choices otherwise."""
    if name not in STRATEGIES:
        raise SurgeryError(f"--strategy {name!r} is not a split strategy (expected one of: {', '.join(STRATEGIES)})")
    return importlib.import_module(STRATEGIES[name])


def default_shared(name: str, ffn: int, num_experts: int) -> int:
    """Shared neurons used when the user gives no size: none, or (strategies with a shared part)
    the size of one routed expert, chosen so that the rest splits evenly: S = ffn - N * (ffn // (N + 1))."""
    if not getattr(strategy(name), "DEFAULT_SHARED", False):
        return 0
    return ffn - num_experts * (ffn // (num_experts + 1))


__all__ = ["LayerInputs", "Partition", "STRATEGIES", "strategy", "default_shared"]
