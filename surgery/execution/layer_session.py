"""One decoder layer on the device and the passes that use it (``LayerRunner.layer`` opens one).

A pass runs every batch through the layer in row chunks (at most ``CALL_TOKENS`` tokens per call), with
probes attached; it may stop at a module's input (a router fit's pass), keep the attention output for the
layer's next pass or replay it, and read the experts one at a time (``expert_stream``). The weights of the
block the router reads are read at the first use that needs them.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from surgery.execution.expert_stream import run_streamed
from surgery.execution.hidden import HiddenStore
from surgery.execution.layer_calls import rows_of
from surgery.execution.probes import StopLayer, gathered_probes, probe_hooks

CALL_TOKENS = 256  # tokens of a batch run through a layer at once: one call's activations; on the 168M merge in
# bfloat16 on 2 CPU cores, 256 ran 8-12 % faster than 512 (4 interleaved runs each) and 2048 slower still


class LayerSession:
    """One materialized decoder layer and the passes that use it. Its router-input block is loaded at the
    first use that needs it (``module``, a pass not stopped at that block, ``parameter``)."""

    def __init__(self, runner, layer: int, module, pending: list):
        """`runner`: the ``LayerRunner`` that opened the session (its weights, batches, placement and stores)."""
        self.runner, self.layer = runner, layer
        self._module, self._pending = module, pending
        self._overrides: dict = {}  # weights set by set_parameter: applied whenever read, never released
        self.needs_output = True  # whether the next layer (or the head) will read this layer's output
        self._attention: HiddenStore | None = None  # kept by a stopped pass (runner.reuse_attention)
        weights = runner.weights
        # transformers' attention module of this layer (a hybrid family's layer type chooses it), and whether it
        # returns a tuple (its output first) or its output alone (Qwen3-Next's linear attention): seen when kept
        self.attention_module = weights.family.attention_module_of(weights.config, layer)
        self._attention_tuple = True

    @property
    def module(self):
        """The decoder layer with all its weights."""
        self._read(self._pending)
        return self._module

    def submodule(self, path: str):
        """A module inside the decoder layer, its weights not read yet (a pass reads them as it needs them)."""
        return self._module.get_submodule(path)

    def _read(self, tensors: list) -> None:
        """Read `tensors` (pending ones: not read yet, or released); a weight set before it was read
        (``set_parameter``) is applied once it is."""
        if not tensors:
            return
        names = {tensor.name for tensor in tensors}
        self._pending = [tensor for tensor in self._pending if tensor.name not in names]
        module = self.runner.load_layer(self.layer, tensors, self._module)
        if not self._pending and any(parameter.is_meta for parameter in module.parameters()):
            raise AssertionError(f"layer {self.layer}: weights left unread")
        for name in names & self._overrides.keys():
            self._apply(name)

    def release(self, prefix: str) -> None:
        """Drop the weights under module `prefix` ("self_attn") from memory until a pass needs them again
        (they are read again then); weights set by ``set_parameter`` stay."""
        prefix, pending = prefix + ".", {tensor.name for tensor in self._pending}
        loaded = [tensor for tensor in self.runner.weights.layer_tensors(self.layer)
                  if tensor.name.startswith(prefix) and tensor.name not in pending | self._overrides.keys()]
        for tensor in loaded:
            path, _, leaf = tensor.name.rpartition(".")
            owner = self._module.get_submodule(path)
            owner._parameters[leaf] = torch.nn.Parameter(torch.empty(tensor.shape, device="meta"),
                                                         requires_grad=False)
        self._pending += loaded

    def _module_for(self, stop_after: str | None, experts_replaced: bool = False, attention_replayed: bool = False):
        """The layer with the weights a pass reads: without its router-input block when the pass stops at that
        block's input or inside the attention before it (RegMean's passes stop at o_proj's input); without its
        experts when their forward is replaced; without its attention when its output is replayed."""
        family = self.runner.weights.family
        attention = self.attention_module
        skip = []
        if stop_after is not None and (stop_after in (family.router_input, attention)
                                       or stop_after.startswith(attention + ".")):
            skip.append(family.router_input + ".")
        if attention_replayed:
            skip.append(attention + ".")
        names = set(self.runner.expert_layouts[self.layer].names) if experts_replaced else set()
        self._read([tensor for tensor in self._pending
                    if tensor.name not in names and not tensor.name.startswith(tuple(skip))])
        return self._module

    def close(self) -> None:
        self._module, self._pending, self._overrides = None, [], {}

    def parameter(self, name: str):
        return self.module.get_parameter(name)

    def set_parameter(self, name: str, value) -> None:
        """Set a weight of the layer; one in the block not loaded yet is set when the block is loaded."""
        self._overrides[name] = value.detach().clone()
        if not any(name == t.name for t in self._pending):
            self._apply(name)

    def _apply(self, name: str) -> None:
        with torch.no_grad():
            parameter = self._module.get_parameter(name)
            parameter.copy_(self._overrides[name].to(device=parameter.device, dtype=parameter.dtype))

    def _chunks(self, index: int, rows: int):
        """Row slices of batch `index` run at once: at most CALL_TOKENS tokens, so one call's activations stay
        small whatever the batch; the arguments the model passes are sliced along the batch rows."""
        length = int(self.runner.batches[index].input_ids.shape[1])
        step = max(1, CALL_TOKENS // max(1, length))
        args, kwargs = self.runner.calls[index][self.layer]
        for start in range(0, rows, step):
            part = slice(start, min(rows, start + step))
            whole = part.start == 0 and part.stop == rows
            yield part, (args, kwargs) if whole else (rows_of(args, part, rows), rows_of(kwargs, part, rows))

    def call(self, index: int, hidden, probes: tuple | list = (), stop_after: str | None = None,
             attention: list | None = None, replay=None, experts: Callable | None = None, joined: bool = True):
        """Batch `index` (its hidden states `hidden`, on the device) through this layer, probes attached;
        each probe sees the batch's real tokens once. Returns the layer's output, or None when `stop_after`
        (or `experts`, raising ``StopLayer``) stopped the pass. `attention`: a list that receives the attention
        output of each row chunk; `replay`: the batch's attention output, used instead of computing it;
        `experts`: called instead of the experts module's forward (``expert_stream``). `hidden` and `replay` are
        tensors or ``HiddenStore.rows`` views (sliced a row chunk at a time); `joined`: False returns the
        output as its list of row pieces (what ``HiddenStore.put`` takes)."""
        mask = self.runner.batches[index].attention_mask.to(self.runner.placement.device).bool()
        module = self._module_for(stop_after, experts is not None, replay is not None)
        outputs, stopped = [], False
        with gathered_probes(probes, index) as gathered:
            for part, (args, kwargs) in self._chunks(index, int(hidden.shape[0])):
                with probe_hooks(module, gathered, mask[part].reshape(-1), stop_after), \
                        self._attention_kept(module, attention, None if replay is None else replay[part]), \
                        self._experts_replaced(module, experts):
                    try:
                        output = module(hidden[part], *args, **kwargs)
                    except StopLayer:
                        stopped = True
                        continue
                outputs.append(output[0] if isinstance(output, tuple) else output)
        return None if stopped else torch.cat(outputs) if joined else outputs

    @contextlib.contextmanager
    def _attention_kept(self, module, sink: list | None, replay):
        """Keep the attention module's output in `sink`, or return `replay` in place of computing it, in the form
        the module returns it (in a tuple, the attention weights None: the decoder layers discard them)."""
        if sink is None and replay is None:
            yield
            return
        attention = module.get_submodule(self.attention_module)
        if replay is not None:
            attention.forward = lambda *args, **kwargs: (replay, None) if self._attention_tuple else replay
            try:
                yield
            finally:
                del attention.forward
            return

        def keep(_module, _args, output):
            self._attention_tuple = isinstance(output, tuple)
            sink.append((output[0] if self._attention_tuple else output).detach())

        handle = attention.register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _experts_replaced(self, module, forward: Callable | None):
        if forward is None:
            yield
            return
        experts = module.get_submodule(self.runner.expert_layouts[self.layer].module)
        experts.forward = forward
        try:
            yield
        finally:
            del experts.forward

    def run(self, hidden: HiddenStore, probes: tuple | list = (), outputs: bool = True, stop_after: str | None = None,
            consume: bool = False):
        """Every batch through this layer; returns the output hidden states (None when `outputs` is
        False). `stop_after`: a module path; each batch's pass stops once that module's input has
        been seen by the probes (what comes after it is not computed). `consume`: `hidden` is not read
        again, so each batch's input is dropped once it has run (the outputs take its place)."""
        runner = self.runner
        full = outputs and stop_after is None
        # a pass whose output nobody reads still reads the experts one at a time where they do not fit together
        whole = stop_after is None and (outputs or not runner.whole_layers_fit)
        streamed = runner.streamed_experts(self.layer, self._pending, probes) if whole else None
        if streamed is not None:
            out = run_streamed(self, streamed, hidden, probes, consume, runner.store("output"))
            if outputs:
                return out
            out.close()
            return None
        out = runner.store("output") if full else None
        keep = stop_after is not None and runner.reuse_attention
        kept = runner.store("attention") if keep else None
        replay, self._attention = (self._attention, None) if stop_after is None else (None, None)
        placement = runner.placement
        with torch.no_grad():
            for index in range(len(runner.batches)):
                pieces = [] if keep else None
                result = self.call(index, hidden.rows(index, placement.device, placement.dtype, last=consume), probes,
                                   stop_after, attention=pieces, joined=False,
                                   replay=None if replay is None else replay.rows(index, placement.device,
                                                                                  placement.dtype, last=True))
                if out is not None:
                    out.put(index, result)
                if keep:
                    kept.put(index, pieces)
        if replay is not None:
            replay.close()
        self._attention = kept
        return out

    def backward(self, hidden: HiddenStore, grad: HiddenStore, probes: tuple | list = ()) -> HiddenStore:
        """Back-propagate the loss gradient of this layer's output (`grad`, per batch) to its input,
        recomputing the layer from its stored input; probes receive values and their gradients."""
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
