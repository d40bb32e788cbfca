"""A model's weights as transformers holds them in memory, one decoder layer at a time.

The weights come from a written checkpoint (each stored tensor read as it is) or from a plan that
is not written yet (each output tensor computed by its recipe and rounded to its output dtype, so
the model that runs is the model that will be written). Either way the source is a map from
stored tensor name to ``Recipe``.

transformers 5 holds an MoE layer's experts fused in memory (``mlp.experts.gate_up_proj``
[E, 2I, H], gate rows first; ``mlp.experts.down_proj`` [E, H, I]) and names Mixtral's router
``mlp.gate``: that is the table's fused layout. A per-expert checkpoint or plan is assembled into
it piece by piece inside one preallocated tensor, so a layer costs its own size plus one stored
tensor. The names and shapes come from the families (``surgery.families``); they are checked against the
transformers module before any weight is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.io.dtypes import torch_dtype
from surgery.plan.nodes import Copy


@dataclass(frozen=True)
class Piece:
    index: tuple  # where the stored tensor goes in the memory tensor; () = all of it
    name: str  # stored tensor name


@dataclass(frozen=True)
class MemoryTensor:
    name: str  # relative to its module (the decoder layer, or the model for embeddings and head)
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    group: str = ""  # the table's group ("experts": a fused [E, ...] tensor, expert e at index e)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelWeights:
    """Every tensor of one model by stored name (recipe and output dtype), and its family and config."""

    config: dict
    family: arch.Family
    recipes: dict  # stored name -> Recipe
    dtypes: dict  # stored name -> safetensors dtype the tensor is (or will be) stored in
    label: str  # how messages name this model (its directory, or "the planned output")
    stored_layout: str = "per_expert"
    _layers: dict = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- sources
    @classmethod
    def from_checkpoint(cls, checkpoint) -> ModelWeights:
        where = checkpoint.directory / "config.json"
        if checkpoint.config is None:
            raise SurgeryError(f"{where}: no such file (running a model needs its config)")
        family = arch.detect_family(checkpoint.config, where)
        layout = arch.detect_expert_layout(family, checkpoint.tensors) if family.kind == "moe" else "per_expert"
        recipes = {name: Copy(checkpoint, name) for name in checkpoint.tensors}
        # a quantized weight is read dequantized in float32, exact (transformers' dequantizing loader's values)
        dtypes = {name: "F32" if info.parts else info.dtype for name, info in checkpoint.tensors.items()}
        weights = cls(checkpoint.config, family, recipes, dtypes, str(checkpoint.directory), layout)
        weights.check_complete()
        return weights

    @classmethod
    def from_plan(cls, plan) -> ModelWeights:
        """The plan's output model, before it is written."""
        family = arch.detect_family(plan.config, "the planned config.json")
        recipes = {tensor.name: tensor.recipe for tensor in plan.tensors}
        dtypes = {tensor.name: tensor.dtype for tensor in plan.tensors}
        weights = cls(plan.config, family, recipes, dtypes, f"the planned {plan.operation} output")
        weights.check_complete()
        return weights

    def check_complete(self) -> None:
        expected = arch.expected_tensors(self.family, self.config, self.stored_layout, where=self.label)
        for name, entry in expected.items():
            if name not in self.recipes:
                raise SurgeryError(f"{self.label}: tensor {name!r} is missing (expected shape {list(entry.shape)})")

    # ---------------------------------------------------------------- layout
    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def layer_tensors(self, layer: int) -> list[MemoryTensor]:
        """The decoder layer's tensors in transformers' in-memory layout, names relative to the layer."""
        if layer not in self._layers:
            self._layers[layer] = _layer_layout(self.family, self.config, layer, self.stored_layout)
        return self._layers[layer]

    def top_tensors(self, role: str) -> list[MemoryTensor]:
        """'embed', 'final_norm' or 'lm_head' (a tied head reads the embedding), names relative to the model, with
        the family's model-level tensors of the same group (a final norm's bias, a head's bias)."""
        group = "head" if role == "lm_head" else "embedding" if role == "embed" else "norm"
        spec = self.family.spec(group, role)
        stored = spec.name()
        if role == "lm_head" and stored not in self.recipes:  # tie_word_embeddings
            stored = self.family.spec("embedding", "embed").name()
        dims = arch.dimensions(self.family, self.config, self.label)
        extra = [other for other in self.family.global_tensors if other.group == group and other.name() in self.recipes]
        return [MemoryTensor(spec.name(), arch.shape_of(spec, dims), (Piece((), stored),))] + [
            MemoryTensor(other.name(), arch.shape_of(other, dims), (Piece((), other.name()),)) for other in extra]

    def nbytes(self, tensors: list[MemoryTensor], element_size: int) -> int:
        return sum(tensor.numel for tensor in tensors) * element_size

    def largest_layer_bytes(self, element_size: int) -> tuple[int, int]:
        """(layer, bytes in memory) of the largest decoder layer, from headers."""
        sizes = [(self.nbytes(self.layer_tensors(layer), element_size), layer) for layer in range(self.num_layers)]
        size, layer = max(sizes)
        return layer, size

    # ---------------------------------------------------------------- values
    def materialize(self, tensors: list[MemoryTensor], dtype, device) -> dict:
        """{name: tensor} in `dtype` on `device`, one stored tensor in flight at a time."""
        return {tensor.name: self._assemble(tensor, dtype, device) for tensor in tensors}

    def materialize_rows(self, tensors: list[MemoryTensor], rows, dtype, device) -> dict:
        """Like ``materialize``, but only rows `rows` are read and written (an embedding looked up by known
        token ids): the rest of each tensor is allocated, never touched, so it takes no memory on the CPU."""
        rows = sorted({int(row) for row in rows})
        out = {}
        for tensor in tensors:
            (piece,) = tensor.pieces
            full = torch.empty(tensor.shape, dtype=dtype, device=device)
            value = self.recipes[piece.name].compute_rows(rows)
            stored = self._stored_dtype(piece.name)
            full[torch.as_tensor(rows, dtype=torch.long, device=device)] = value.to(stored).to(device=device, dtype=dtype)
            out[tensor.name] = full
        return out

    def materialize_expert(self, tensors: list[MemoryTensor], expert: int, dtype, device) -> dict:
        """Expert `expert`'s slice of each fused expert tensor ([1, ...]), reading only that expert's stored
        tensors (or rows of a fused stored tensor)."""
        out = {}
        for tensor in tensors:
            shape = (1, *tensor.shape[1:])
            pieces = tuple(Piece((0, *piece.index[1:]), piece.name) for piece in tensor.pieces
                           if piece.index and piece.index[0] == expert)
            if pieces:
                out[tensor.name] = self._assemble(MemoryTensor(tensor.name, shape, pieces), dtype, device)
            else:  # stored fused: the expert is row `expert` of the stored tensor
                (piece,) = tensor.pieces
                out[tensor.name] = self._value(piece.name, shape, rows=[expert]).to(device=device, dtype=dtype)
        return out

    def _stored_dtype(self, name: str):
        return torch_dtype(self.dtypes[name])

    def _assemble(self, tensor: MemoryTensor, dtype, device):
        if len(tensor.pieces) == 1 and tensor.pieces[0].index == ():
            value = self._value(tensor.pieces[0].name, tensor.shape)
            return value.to(device=device, dtype=dtype)
        out = torch.empty(tensor.shape, dtype=dtype, device=device)
        for piece in tensor.pieces:
            target = out[piece.index]
            target.copy_(self._value(piece.name, tuple(target.shape)))
        return out

    def _value(self, name: str, shape: tuple, rows: list | None = None):
        recipe = self.recipes[name]
        value = recipe.compute() if rows is None else recipe.compute_rows(rows)
        stored = self._stored_dtype(name)
        if value.dtype != stored:  # a plan's value, rounded as the writer will round it
            value = value.to(stored)
        if tuple(value.shape) != tuple(shape):
            raise SurgeryError(f"{self.label}: tensor {name!r} has shape {list(value.shape)}, transformers expects "
                               f"{list(shape)} for it")
        return value


def layer_prefix(layer: int) -> str:
    return arch.L.format(layer=layer)


def _layer_layout(family: arch.Family, config: dict, layer: int, stored_layout: str) -> list[MemoryTensor]:
    """Memory tensors of one layer: the table's fused layout, each made of stored tensors."""
    prefix = layer_prefix(layer)
    memory = [e for e in arch.expected_tensors(family, config, "fused").values() if e.layer == layer]
    out = []
    for entry in memory:
        name = family.memory_name(entry.name[len(prefix):])
        if entry.group == "router":
            stored = next(spec for spec in arch.router_specs(family, stored_layout) if spec.role == entry.role)
            out.append(MemoryTensor(name, entry.shape, (Piece((), stored.name(layer)),), entry.group))
        elif entry.group == "experts" and stored_layout != "fused":
            out.append(MemoryTensor(name, entry.shape, _expert_pieces(family, entry, layer), entry.group))
        else:
            out.append(MemoryTensor(name, entry.shape, (Piece((), entry.name),), entry.group))
    return out


def _expert_pieces(family: arch.Family, entry, layer: int) -> tuple[Piece, ...]:
    """A fused [E, rows, cols] tensor from per-expert tensors: expert e's parts stacked along rows."""
    experts, rows = entry.shape[0], entry.shape[1]
    parts = family.fused_parts[entry.role]
    size = rows // len(parts)
    pieces = []
    for expert in range(experts):
        for position, role in enumerate(parts):
            name = family.spec("experts", role).name(layer, expert)
            pieces.append(Piece((expert, slice(position * size, (position + 1) * size)), name))
    return tuple(pieces)
