"""How a plan's tensors are laid out in shards, and what writing each of them takes.

``assign_shards`` cuts the plan into shards in plan order (within a shard: byte copies first, then
computed tensors, deferred ones last). ``is_byte_copy``, ``is_deferred`` and ``needs_torch`` say how the
writer will produce a tensor, known from headers alone (the dry run counts shards the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

from surgery.io.checkpoint import SINGLE_NAME
from surgery.plan.nodes import Copy, Deferred, Joined
from surgery.plan.plan import OutputTensor


@dataclass
class Shard:
    file_name: str
    tensors: list[OutputTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def is_deferred(tensor: OutputTensor) -> bool:
    return isinstance(tensor.recipe, Deferred)


def is_byte_copy(tensor: OutputTensor) -> bool:
    """Whether the writer copies this tensor's bytes unchanged (no torch, no computation)."""
    recipe = tensor.recipe
    return isinstance(recipe, Copy) and not recipe.quantized and recipe.checkpoint.info(recipe.name).dtype == tensor.dtype


def needs_torch(tensor: OutputTensor) -> bool:
    """Whether writing this tensor imports torch: neither a byte copy nor computable with numpy alone (a
    Joined tensor: whether any part does)."""
    if isinstance(tensor.recipe, Joined):
        return any(needs_torch(OutputTensor(tensor.name, (), tensor.dtype, part)) for part in tensor.recipe.items)
    return not is_byte_copy(tensor) and not tensor.recipe.numpy_ready(tensor.dtype)


def assign_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[Shard]:
    """Greedy, in plan order: a new shard starts when the next tensor would overflow this one.

    Within a shard, byte copies come first and computed tensors after (each group in plan order):
    the copies need no torch, so torch is imported in the background while the kernel copies.
    Deferred tensors come last, so the shard can be hashed up to them while it is written.
    """
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    groups = [sorted(group, key=lambda tensor: (is_deferred(tensor), not is_byte_copy(tensor))) for group in groups]
    if len(groups) == 1:
        return [Shard(SINGLE_NAME, groups[0])]
    count = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{count:05d}.safetensors", group) for i, group in enumerate(groups)]
