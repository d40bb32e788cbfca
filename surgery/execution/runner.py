"""The engine of a layer pass: a model's embedding, one decoder layer, and its head, over a fixed token set.

    runner = LayerRunner(weights, calibration.batches, placement, budget)
    hidden = runner.embed()                      # hidden states entering layer 0, every batch
    with runner.layer(layer) as session:         # this layer's weights, on the device
        hidden = session.run(hidden, probes)     # every batch through it; probes see what they need
    runner.head(hidden, consume)                 # final norm and head, in chunks of rows

Which layers run, in which order, with which probes, is the layer pass's (``surgery.execution.layer_pass``):
nothing else loops over a model's layers.

Memory: one decoder layer's weights in the compute dtype, the hidden states of the token set
(float32, or the compute dtype when it is 16-bit; in memory or spilled to a file as the budget decides),
one batch's activations, and the embedding or the head only while they are used. Cost: each layer runs
once over the tokens.
See ``surgery.execution.skeleton`` for how transformers' own modules do every computation.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable

import torch

from surgery import console
from surgery.errors import SurgeryError
from surgery.execution.expert_stream import ExpertLayout, expert_calls, expert_layout, streamable
from surgery.execution.hidden import HiddenStore
from surgery.execution.layer_calls import shared
from surgery.execution.layer_session import LayerSession
from surgery.execution.placement import Placement
from surgery.execution.settings import MemoryBudget
from surgery.execution.skeleton import Skeleton
from surgery.execution.weights import ModelWeights
from surgery.io.finite import nonfinite_counts
from surgery.process_memory import bound_process_memory, trim_heap
from surgery.units import format_bytes

HEAD_CHUNK_BYTES = 64 * 2**20  # logits computed at once per model (rows x T x vocab x 4 bytes)


class LayerRunner:
    def __init__(self, weights: ModelWeights, batches: list, placement: Placement, budget: MemoryBudget,
                 spill_dir: Path | None = None, keep_layer_inputs: bool = False, reuse_attention: bool = False):
        """`reuse_attention`: a pass stopped inside a layer (``LayerSession.run(stop_after=...)``) keeps the
        attention output of every batch, and the layer's next full run replays it instead of computing it
        again (the same values: same inputs, same weights); it costs one more set of hidden states."""
        bound_process_memory()
        self.weights, self.batches, self.placement, self.budget = weights, batches, placement, budget
        self.num_layers = weights.num_layers
        element = placement.element_size
        self.layer_bytes = weights.largest_layer_bytes(element)
        self.expert_layouts = {layer: expert_layout(weights.layer_tensors(layer), element)
                               for layer in range(self.num_layers)}
        top = max(weights.nbytes(weights.top_tensors(role), element) for role in ("embed", "lm_head"))
        hidden = int(weights.config["hidden_size"])
        hidden_bytes = sum(int(b.input_ids.numel()) for b in batches) * hidden * min(4, element)  # see HiddenStore
        self.reuse_attention, self.keep_layer_inputs = reuse_attention, keep_layer_inputs
        self._skeleton = None
        stores = (self.num_layers + 2 if keep_layer_inputs else 2) + (1 if reuse_attention else 0)
        self.stream_experts, in_memory = self._placement(
            budget, top, stores * hidden_bytes, (2 if reuse_attention else 3) * hidden_bytes)
        self.spill_dir = None
        if not in_memory:
            self.spill_dir = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())
            console.info(f"hidden states ({format_bytes(stores * hidden_bytes)}) do not fit in {budget.text} beside "
                         f"one layer: spilled to a temporary file in {self.spill_dir}")
        if self.stream_experts and self.layer_bytes[1] > budget.limit:
            console.info(f"layer {self.layer_bytes[0]} ({format_bytes(self.layer_bytes[1])} in "
                         f"{placement.dtype_name}) does not fit in {budget.text}: its experts are read one at a time")
        self.calls: list | None = None  # per batch: [(args, kwargs)] per layer (recorded by embed)

    def _placement(self, budget: MemoryBudget, top: int, stores: int, stream_stores: int) -> tuple[bool, bool]:
        """(experts read one at a time, hidden states in memory) for a full pass:
        the smallest footprint that keeps the hidden states in memory, else the smallest with them spilled.
        Reading experts one at a time (``expert_stream``) needs one expert instead of all, and `stream_stores`
        more hidden states; on a GPU, which holds the weights, experts are read together."""
        self.whole_layers_fit = True  # a layer's experts fit the budget together (else: read one at a time)
        if self.placement.device != "cpu":  # the weights are on the GPU: only the hidden states take CPU memory
            return False, stores <= budget.limit
        whole = self.layer_bytes[1]
        streamed = max(layout.other_bytes + layout.expert_bytes if self._streamable(layer) else
                       self.weights.nbytes(self.weights.layer_tensors(layer), self.placement.element_size)
                       for layer, layout in self.expert_layouts.items())
        options = [(False, whole)] + ([(True, streamed)] if streamed < whole else [])
        for in_memory in (True, False):
            fits = []
            for streams, weights in options:
                hidden = (stores + (stream_stores if streams else 0)) if in_memory else 0
                if max(weights, top) + hidden <= budget.limit:  # the embedding or head runs when no layer is read
                    fits.append((weights + hidden, streams))
            if fits:
                self.whole_layers_fit = any(not streams for _, streams in fits)
                return min(fits)[1], in_memory
        layer, size = self.layer_bytes
        what = f"layer {layer} needs {format_bytes(size)}" if size >= top else f"the embedding needs {format_bytes(top)}"
        if streamed < size and size >= top:
            what += f" ({format_bytes(max(streamed, top))} with its experts read one at a time)"
        elif size >= top and self.expert_layouts.get(layer) is not None and not self._streamable(layer):
            what += (f" (its experts are read together: {self.weights.family.architecture}'s experts module cannot "
                     "run one expert on its own tokens)")
        raise SurgeryError(f"{budget.text} is too small to run one layer of {self.weights.label}: {what} in "
                           f"{self.placement.dtype_name}")

    def _streamable(self, layer: int) -> bool:
        """Whether the layer's experts can be read one at a time: it has several, and transformers' experts module
        runs one expert on its own (``expert_stream.streamable``: its family's calling convention)."""
        layout = self.expert_layouts.get(layer)
        return layout is not None and streamable(self.skeleton.templates[layer].get_submodule(layout.module), layout,
                                                 expert_calls(self.weights.family, self.weights.config))

    def streamed_experts(self, layer: int, pending: list, probes) -> ExpertLayout | None:
        """The layer's experts, when a full pass reads them one at a time: the runner chose to, they are not
        read yet, and no probe looks inside them (but one on their outputs per expert, or an optional one where a
        whole layer does not fit the budget)."""
        layout = self.expert_layouts.get(layer)
        if not self.stream_experts or layout is None:
            return None
        if not set(layout.names) <= {tensor.name for tensor in pending}:
            return None
        inside = [probe for probe in probes if probe.where != "expert_outputs"
                  and (probe.module == layout.module or probe.module.startswith(layout.module + "."))]
        if any(not probe.optional or self.whole_layers_fit for probe in inside):
            return None
        return layout if self._streamable(layer) else None

    def load_expert(self, layer: int, layout: ExpertLayout, expert: int) -> dict:
        """Expert `expert`'s [1, ...] slices of the layer's fused expert tensors, on the device."""
        tensors = [tensor for tensor in self.weights.layer_tensors(layer) if tensor.name in layout.names]
        state = self.weights.materialize_expert(tensors, expert, self.placement.dtype, self.placement.device)
        for name, value in state.items():
            _refuse_nonfinite(value, f"layer {layer} {name} (expert {expert})", self.weights.label)
        return self._matmul_order(state, tensors)

    def _matmul_order(self, state: dict, tensors: list) -> dict:
        """`state` with input-major expert weights (``Family.experts_input_major``) held in [E, out, in] memory order
        where that is PyTorch's fast matmul: on the CPU, in bf16 or fp16. Same values, same shapes (transposed
        views); the matmul's rounding may differ from transformers' own pass in the last bit."""
        if not self.weights.family.experts_input_major or self.placement.device != "cpu" or \
                self.placement.element_size > 2:
            return state
        experts = {tensor.name for tensor in tensors if tensor.group == "experts"}
        return {name: value.transpose(-1, -2).contiguous().transpose(-1, -2) if name in experts and value.dim() == 3
                else value for name, value in state.items()}

    # ---------------------------------------------------------------- pieces
    @property
    def skeleton(self):
        if self._skeleton is None:
            self._skeleton = Skeleton(self.weights.config, self.weights.family, self.placement.device,
                                      self.placement.dtype, self.weights.label)
        return self._skeleton

    def store(self, label: str = "hidden") -> HiddenStore:
        return HiddenStore(self.spill_dir, label)

    def _top_state(self, *roles) -> dict:
        tensors = [tensor for role in roles for tensor in self.weights.top_tensors(role)]
        state = self.weights.materialize(tensors, self.placement.dtype, self.placement.device)
        for name, value in state.items():
            _refuse_nonfinite(value, name, self.weights.label)
        return state

    # ---------------------------------------------------------------- phases
    def record_calls(self) -> None:
        """Record the arguments the model passes each layer for each batch (masks, rotary embeddings), once: a run
        of single layers on another model's hidden states needs them without this model's own embedding."""
        if self.calls is None:
            self.embed().close()

    def embed(self) -> HiddenStore:
        """Hidden states entering layer 0 for every batch (and the per-layer arguments of each batch).

        Only the embedding rows of the token ids in the batches are read (the embedding of a 150k
        vocabulary is larger than a decoder layer)."""
        ids = torch.unique(torch.cat([batch.input_ids.reshape(-1) for batch in self.batches])).tolist()
        state = self.weights.materialize_rows(self.weights.top_tensors("embed"), ids, self.placement.dtype,
                                              self.placement.device)
        for name, value in state.items():
            _refuse_nonfinite(value[torch.as_tensor(ids, device=value.device)], name, self.weights.label)
        out = self.store("input")
        calls = []
        for index, batch in enumerate(self.batches):
            hidden, batch_calls = self.skeleton.record(state, batch)
            out.put(index, hidden)
            calls.append(shared(batch_calls, calls))
        self.calls = calls
        del state
        return out

    @contextlib.contextmanager
    def layer(self, layer: int):
        """Decoder layer `layer` with its weights on the device, for the duration of the block.

        The weights of the block the router reads (``Family.router_input``: the MLP or MoE block, most of a
        layer) are read when first needed: a pass stopped at that block's input (a router fit's) runs without
        them, so the fit's data and the experts are never in memory together, and a last layer whose output
        nobody reads never has them read at all."""
        tensors = self.weights.layer_tensors(layer)
        self.skeleton.check_layer(layer, tensors)
        block = self.weights.family.router_input + "."
        session = LayerSession(self, layer, self.load_layer(layer, [t for t in tensors if not t.name.startswith(block)]),
                               [t for t in tensors if t.name.startswith(block)])
        try:
            yield session
        finally:
            session.close()
            _release(self.placement.device)

    def load_layer(self, layer: int, tensors: list, module=None):
        """A copy of decoder layer `layer` holding `tensors` (into `module`, a partly loaded one, if given)."""
        state = self.weights.materialize(tensors, self.placement.dtype, self.placement.device)
        for name, value in state.items():
            _refuse_nonfinite(value, f"layer {layer} {name}", self.weights.label)
        return self.skeleton.materialize(layer, self._matmul_order(state, tensors), module)

    def head(self, hidden: HiddenStore, consume: Callable, *, grad: bool = False, norm_output: bool = False,
             norm_only: bool = False):
        """Logits of every batch, in chunks of rows: consume(batch_index, rows (slice), logits, extra).

        With `grad`, the last layer's output requires gradients and `extra["last_hidden"]` is it, so a
        loss on the logits can be back-propagated to it. With `norm_output`, `extra["norm"]` is the
        final norm's output (the model's last hidden state); `norm_only`: only that (logits None, the
        head is neither read nor run).
        """
        heads([(self, hidden)], lambda index, part, logits, extras: consume(index, part, logits[0], extras[0]),
              grad=grad, norm_output=norm_output or norm_only, norm_only=norm_only)


def heads(runs: list, consume: Callable, *, grad: bool = False, norm_output: bool = False,
          norm_only: bool = False) -> None:
    """The head of several models over the same batches, chunk by chunk, in lockstep:
    consume(batch_index, rows, [logits of each model], [extra of each model]). `runs`: [(runner, last hidden)]."""
    first = runs[0][0]
    states = [runner._top_state(*(("final_norm",) if norm_only else ("final_norm", "lm_head"))) for runner, _ in runs]
    vocab = int(first.weights.config["vocab_size"])
    placement = first.placement
    for index, batch in enumerate(first.batches):
        full = [hidden.get(index, runner.placement.device, runner.placement.dtype) for runner, hidden in runs]
        rows, length = int(full[0].shape[0]), int(full[0].shape[1])
        step = max(1, HEAD_CHUNK_BYTES // max(1, length * vocab * 4))
        for start in range(0, rows, step):
            part = slice(start, min(rows, start + step))
            logits, extras = [], []
            with torch.set_grad_enabled(grad):
                for (runner, _), state, value in zip(runs, states, full):
                    last = value[part].detach().requires_grad_(grad)
                    captured: list = []
                    logits.append(runner.skeleton.head(state, last, batch.attention_mask[part],
                                                       captured if norm_output else None, norm_only))
                    extras.append({"last_hidden": last, "norm": captured[0] if captured else None})
                consume(index, part, logits, extras)
    del states
    _release(placement.device)


def _refuse_nonfinite(value, name: str, label: str) -> None:
    if nonfinite_counts(value) is not None:
        raise SurgeryError(f"{label}: NaN or Inf in {name}; running the model would give meaningless numbers")


def _release(device: str) -> None:
    """Return a dropped layer's memory: tensors are freed by reference counting, but the CUDA cache keeps its
    blocks, and glibc the free pages inside its heap (``process_memory.trim_heap``)."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    trim_heap()
