"""Running a model one decoder layer at a time over a fixed token set (sequential execution).

    runner = LayerRunner(weights, calibration.batches, placement, budget)
    hidden = runner.embed()                      # hidden states entering layer 0, every batch
    for layer in range(runner.num_layers):
        with runner.layer(layer) as session:     # this layer's weights, on the device
            hidden = session.run(hidden, probes)  # every batch through it; probes see what they need
    logits = runner.head(hidden, ...)            # final norm and head, in chunks of rows

Memory: one decoder layer's weights in the compute dtype, the hidden states of the token set
(float32, or the compute dtype when it is 16-bit; in memory or spilled to a file as the budget decides),
one batch's activations, and the embedding or the head only while they are used. Cost: each layer runs
once over the tokens.
See ``surgery.execution.skeleton`` for how transformers' own modules do every computation.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from surgery import console
from surgery.errors import SurgeryError
from surgery.execution.hidden import HiddenStore, MemoryBudget
from surgery.execution.layer_calls import rows_of, shared
from surgery.execution.placement import Placement
from surgery.execution.probes import StopLayer, gathered_probes, probe_hooks
from surgery.execution.weights import ModelWeights
from surgery.process_memory import bound_process_memory, trim_heap

HEAD_CHUNK_BYTES = 64 * 2**20  # logits computed at once per model (rows x T x vocab x 4 bytes)
CALL_TOKENS = 256  # tokens of a batch run through a layer at once: one call's activations; on the 168M merge in
# bfloat16 on 2 CPU cores, 256 ran 8-12 % faster than 512 (4 interleaved runs each) and 2048 slower still


class LayerRunner:
    def __init__(self, weights: ModelWeights, batches: list, placement: Placement, budget: MemoryBudget,
                 spill_dir: Path | None = None, keep_layer_inputs: bool = False, reuse_attention: bool = False):
        """`reuse_attention`: a pass stopped inside a layer (``LayerSession.run(stop_after=...)``) keeps the
        attention output of every batch, and the layer's next full run replays it instead of computing it
        again (the same values: same inputs, same weights); it costs one more set of hidden states."""
        from surgery.units import format_bytes

        bound_process_memory()
        self.weights, self.batches, self.placement, self.budget = weights, batches, placement, budget
        self.num_layers = weights.num_layers
        element = placement.element_size
        self.layer_bytes = weights.largest_layer_bytes(element)
        top = max(weights.nbytes(weights.top_tensors(role), element) for role in ("embed", "lm_head"))
        hidden = int(weights.config["hidden_size"])
        hidden_bytes = sum(int(b.input_ids.numel()) for b in batches) * hidden * min(4, element)  # see HiddenStore
        on_cpu = placement.device == "cpu"
        weights_in_ram = (max(self.layer_bytes[1], top) if on_cpu else 0)
        if weights_in_ram > budget.limit:
            layer, size = self.layer_bytes
            what = f"layer {layer} needs {format_bytes(size)}" if size >= top else f"the embedding needs {format_bytes(top)}"
            raise SurgeryError(f"{budget.text} is too small to run one layer of {weights.label}: {what} in "
                               f"{placement.dtype_name}")
        self.reuse_attention = reuse_attention
        stores = (self.num_layers + 2 if keep_layer_inputs else 2) + (1 if reuse_attention else 0)
        self.spill_dir = None
        if weights_in_ram + stores * hidden_bytes > budget.limit:
            self.spill_dir = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())
            console.info(f"hidden states ({format_bytes(stores * hidden_bytes)}) do not fit in {budget.text} beside "
                         f"one layer: spilled to a temporary file in {self.spill_dir}")
        self._skeleton = None
        self._calls: list | None = None  # per batch: [(args, kwargs)] per layer

    # ---------------------------------------------------------------- pieces
    @property
    def skeleton(self):
        if self._skeleton is None:
            from surgery.execution.skeleton import Skeleton

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
    def embed(self) -> HiddenStore:
        """Hidden states entering layer 0 for every batch (and the per-layer arguments of each batch).

        Only the embedding rows of the token ids in the batches are read (the embedding of a 150k
        vocabulary is larger than a decoder layer)."""
        import torch

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
        self._calls = calls
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
        session = LayerSession(self, layer, self._load(layer, [t for t in tensors if not t.name.startswith(block)]),
                               [t for t in tensors if t.name.startswith(block)])
        try:
            yield session
        finally:
            session.close()
            _release(self.placement.device)

    def _load(self, layer: int, tensors: list, module=None):
        """A copy of decoder layer `layer` holding `tensors` (into `module`, a partly loaded one, if given)."""
        state = self.weights.materialize(tensors, self.placement.dtype, self.placement.device)
        for name, value in state.items():
            _refuse_nonfinite(value, f"layer {layer} {name}", self.weights.label)
        return self.skeleton.materialize(layer, state, module)

    def forward(self, visit: Callable | None = None, last: int | None = None, keep_inputs: bool = False,
                final_output: bool = True, description: str = "running layers", before_layer: Callable | None = None):
        """Every batch through layers 0..`last` (default: all). `visit(layer, session, hidden)` may run the
        layer itself (returning the next hidden states, or None when ``session.needs_output`` is False)
        or return None to let it run plainly. `before_layer(layer, hidden)` runs before the layer's weights are
        read (it may write them: a draft filled layer by layer). `final_output`: whether the last layer's output
        is needed; `description`: the progress bar's label (None: no bar).
        Returns (hidden states after the last layer run, [inputs of every layer] when `keep_inputs`)."""
        last = self.num_layers - 1 if last is None else last
        hidden = self.embed()
        kept = []
        bar = console.progress(description, last + 1, unit_bytes=False) if description else contextlib.nullcontext(
            lambda amount, text=None: None)  # no bar: e.g. a run in a background thread beside the writer's bar
        with bar as advance:
            for layer in range(last + 1):
                if before_layer is not None:
                    before_layer(layer, hidden)
                with self.layer(layer) as session:
                    session.needs_output = layer < last or final_output
                    result = visit(layer, session, hidden) if visit else None
                    if result is None and session.needs_output:
                        result = session.run(hidden, consume=not keep_inputs)
                if keep_inputs:
                    kept.append(hidden)
                else:
                    hidden.close()
                hidden = result
                advance(1, f"layer {layer}")
        return hidden, kept

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
    import torch

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


class LayerSession:
    """One materialized decoder layer and the passes that use it. Its router-input block is loaded at the
    first use that needs it (``module``, a pass not stopped at that block, ``parameter``)."""

    def __init__(self, runner: LayerRunner, layer: int, module, pending: list):
        self.runner, self.layer = runner, layer
        self._module, self._pending, self._overrides = module, pending, {}
        self.needs_output = True  # whether the next layer (or the head) will read this layer's output
        self._attention: HiddenStore | None = None  # kept by a stopped pass (runner.reuse_attention)

    @property
    def module(self):
        """The decoder layer with all its weights."""
        if self._pending:
            pending, self._pending = self._pending, []
            module = self.runner._load(self.layer, pending, self._module)
            if any(parameter.is_meta for parameter in module.parameters()):
                raise AssertionError(f"layer {self.layer}: weights left unread")
            overrides, self._overrides = self._overrides, {}
            for name, value in overrides.items():
                self.set_parameter(name, value)
        return self._module

    def _module_for(self, stop_after: str | None):
        """The layer as a pass stopped at `stop_after` needs it: without its router-input block when the pass
        stops at that block's input."""
        return self._module if stop_after == self.runner.weights.family.router_input else self.module

    def close(self) -> None:
        self._module, self._pending, self._overrides = None, [], {}

    def parameter(self, name: str):
        return self.module.get_parameter(name)

    def set_parameter(self, name: str, value) -> None:
        """Set a weight of the layer; one in the block not loaded yet is set when the block is loaded."""
        import torch

        if any(name == t.name for t in self._pending):
            self._overrides[name] = value.detach().clone()
            return
        with torch.no_grad():
            parameter = self._module.get_parameter(name)
            parameter.copy_(value.to(device=parameter.device, dtype=parameter.dtype))

    def _chunks(self, index: int, rows: int):
        """Row slices of batch `index` run at once: at most CALL_TOKENS tokens, so one call's activations stay
        small whatever the batch; the arguments the model passes are sliced along the batch rows."""
        length = int(self.runner.batches[index].input_ids.shape[1])
        step = max(1, CALL_TOKENS // max(1, length))
        args, kwargs = self.runner._calls[index][self.layer]
        for start in range(0, rows, step):
            part = slice(start, min(rows, start + step))
            whole = part.start == 0 and part.stop == rows
            yield part, (args, kwargs) if whole else (rows_of(args, part, rows), rows_of(kwargs, part, rows))

    def call(self, index: int, hidden, probes: tuple | list = (), stop_after: str | None = None,
             attention: list | None = None, replay=None):
        """Batch `index` (its hidden states `hidden`, on the device) through this layer, probes attached;
        each probe sees the batch's real tokens once. Returns the layer's output, or None when `stop_after`
        stopped the pass. `attention`: a list that receives the attention output of each row chunk;
        `replay`: the batch's attention output, used instead of computing it."""
        import torch

        mask = self.runner.batches[index].attention_mask.to(self.runner.placement.device).bool()
        module = self._module_for(stop_after)
        outputs, stopped = [], False
        with gathered_probes(probes, index) as gathered:
            for part, (args, kwargs) in self._chunks(index, int(hidden.shape[0])):
                with probe_hooks(module, gathered, mask[part].reshape(-1), stop_after), \
                        self._attention_kept(module, attention, None if replay is None else replay[part]):
                    try:
                        output = module(hidden[part], *args, **kwargs)
                    except StopLayer:
                        stopped = True
                        continue
                outputs.append(output[0] if isinstance(output, tuple) else output)
        return None if stopped else torch.cat(outputs)

    @contextlib.contextmanager
    def _attention_kept(self, module, sink: list | None, replay):
        """Keep the attention module's output in `sink`, or return `replay` in place of computing it (its
        second output, the attention weights, is None: the decoder layers discard it)."""
        if sink is None and replay is None:
            yield
            return
        attention = module.get_submodule(self.runner.weights.family.attention_module)
        if replay is not None:
            attention.forward = lambda *args, **kwargs: (replay, None)
            try:
                yield
            finally:
                del attention.forward
            return
        handle = attention.register_forward_hook(lambda _m, _args, output: sink.append(output[0].detach()))
        try:
            yield
        finally:
            handle.remove()

    def run(self, hidden: HiddenStore, probes: tuple | list = (), outputs: bool = True, stop_after: str | None = None,
            consume: bool = False):
        """Every batch through this layer; returns the output hidden states (None when `outputs` is
        False). `stop_after`: a module path; each batch's pass stops once that module's input has
        been seen by the probes (what comes after it is not computed). `consume`: `hidden` is not read
        again, so each batch's input is dropped once it has run (the outputs take its place)."""
        import torch

        runner = self.runner
        out = runner.store("output") if outputs and stop_after is None else None
        keep = stop_after is not None and runner.reuse_attention
        kept = runner.store("attention") if keep else None
        replay, self._attention = (self._attention, None) if stop_after is None else (None, None)
        placement = runner.placement
        with torch.no_grad():
            for index in range(len(runner.batches)):
                value = (hidden.take if consume else hidden.get)(index, placement.device, placement.dtype)
                pieces = [] if keep else None
                result = self.call(index, value, probes, stop_after, attention=pieces,
                                   replay=None if replay is None else replay.take(index, placement.device, placement.dtype))
                del value
                if out is not None:
                    out.put(index, result)
                if keep:
                    kept.put(index, torch.cat(pieces))
        if replay is not None:
            replay.close()
        self._attention = kept
        return out

    def backward(self, hidden: HiddenStore, grad: HiddenStore, probes: tuple | list = ()) -> HiddenStore:
        """Back-propagate the loss gradient of this layer's output (`grad`, per batch) to its input,
        recomputing the layer from its stored input; probes receive values and their gradients."""
        import torch

        runner = self.runner
        out = runner.store("gradient")
        for index, batch in enumerate(runner.batches):
            mask = batch.attention_mask.to(runner.placement.device).bool()
            value = hidden.get(index, runner.placement.device, runner.placement.dtype)
            upstream = grad.get(index, runner.placement.device, value.dtype)
            grads = []
            with gathered_probes(probes, index, with_grad=True) as gathered:
                for part, (args, kwargs) in self._chunks(index, int(value.shape[0])):
                    piece = value[part].detach().requires_grad_(True)
                    with torch.enable_grad(), probe_hooks(self.module, gathered, mask[part].reshape(-1), None,
                                                     with_grad=True):
                        result = self.module(piece, *args, **kwargs)
                        result = result[0] if isinstance(result, tuple) else result
                        result.backward(upstream[part].to(result.dtype))
                    grads.append(piece.grad)
            out.put(index, torch.cat(grads))
        return out


def _refuse_nonfinite(value, name: str, label: str) -> None:
    """A sum in the tensor's own dtype is finite unless the tensor holds NaN/Inf or the sum overflows; only
    a non-finite sum is checked element by element (a float32 sum of bfloat16 values costs 4x more)."""
    import torch

    if value.is_floating_point() and not bool(torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
        raise SurgeryError(f"{label}: NaN or Inf in {name}; running the model would give meaningless numbers")


def _release(device: str) -> None:
    """Return a dropped layer's memory: tensors are freed by reference counting, but the CUDA cache keeps its
    blocks, and glibc the free pages inside its heap (``process_memory.trim_heap``)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    trim_heap()
