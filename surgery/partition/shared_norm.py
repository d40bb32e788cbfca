"""`shared-norm` (data-free shared part): the S neurons with the largest
||down column|| * ||up row|| are shared by every token; the rest are split randomly."""

from __future__ import annotations

from surgery.partition import random_split
from surgery.partition.base import LayerInputs, Partition

NAME = "shared-norm"
NEEDS: frozenset = frozenset()
DEFAULT_SHARED = True  # without --shared-neurons/--shared-fraction: a shared part the size of one expert


def split(inputs: LayerInputs) -> Partition:
    return random_split.split(inputs)  # the shared part is chosen by weight norm in split_shared
