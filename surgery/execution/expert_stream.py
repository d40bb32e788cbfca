"""A decoder layer's full pass with its experts read one at a time.

An MoE layer's experts are most of its weights (4 experts of the 168M merge: 132 of its 148 MiB in
float32; 128 experts of a large MoE: a layer bigger than the machine's memory). Instead of reading them
all, the pass runs in three steps, every computation still transformers' own:

1. capture: every batch runs through the layer (its attention replayed, or computed and kept) up to the
   experts module, whose inputs are kept (``ExpertCalls.capture``) and the rest of the call is skipped;
2. experts: for expert e in order, its weights alone are read into a one-expert copy of the experts
   module, which runs on the kept inputs; its output is added to the running sum of the experts' output;
3. replay: every batch runs through the whole layer again (attention replayed), the experts module
   returning the sum instead of computing it, so the rest of the layer (residual, shared expert, norms)
   and every probe see exactly what a plain pass gives.

How an experts module is called is its family's ``experts_call``:

* "routed" (transformers 5): (hidden_states, top_k_index, top_k_weights); expert e's copy runs on the kept
  arguments with ``top_k_index`` remapped (e -> 0, every other expert -> transformers' "no expert" index).
  transformers' experts add each expert's rows into a zero tensor in expert order; step 2 adds the same rows,
  from the same row chunks, in the same order, so the output is bit-identical to the plain pass on the CPU.
* "routed_rows" (gpt-oss): the same three arguments under its own names, with no "no expert" index: expert e's
  copy runs on the rows routed to e alone (index 0, their gate weights), in transformers' order, and its output
  is added at those rows: bit-identical as above.
* "scaled" (Llama 4): every expert's copy of every token back to back, each scaled by its router score (0 for
  the experts a token did not choose); the block then sums the experts' outputs. The router's input and scores
  are kept instead of the E copies; expert e runs on the tokens that chose it times their scores for e
  (transformers' very product), the others' rows staying zero, as the block's own run gives them (its experts'
  FFN has no bias): top-k of E experts' compute instead of all E on every token (Maverick: 1 of 128). Step 3
  returns the sum followed by zeros, which the block's sum over experts leaves as it is. The experts run on
  fewer rows and are summed in expert order, not in torch's reduction order: equal to the plain pass within
  float rounding, not bit for bit.

Memory: the layer's other weights but its attention's (dropped once the attention output is kept,
read again by the next pass that computes it), one expert, and two more sets of hidden states (the
experts' input and output; three without a kept attention output), in memory or spilled as the budget
decides; spilled ones are read and written a row chunk at a time.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

from surgery import families as arch
from surgery.execution.probes import StopLayer
from surgery.execution.routing_stats import expert_output_norms, one_expert, router_path
from surgery.process_memory import trim_heap

ARGUMENTS = ("hidden_states", "top_k_index", "top_k_weights")  # transformers 5's experts modules


@dataclass(frozen=True)
class ExpertLayout:
    """Where a layer's experts are and what one of them costs."""

    module: str  # the experts module, relative to the decoder layer ("mlp.experts")
    count: int
    names: tuple[str, ...]  # its fused [E, ...] memory tensors
    expert_bytes: int  # one expert, in the compute dtype
    other_bytes: int  # the rest of the layer


def expert_layout(tensors: list, element_size: int) -> ExpertLayout | None:
    """The experts of a layer given its memory tensors (None: a dense layer, or a single expert: nothing to read
    apart)."""
    experts = [tensor for tensor in tensors if tensor.group == "experts"]
    modules = {tensor.name.rpartition(".")[0] for tensor in experts}
    counts = {tensor.shape[0] for tensor in experts}
    if len(modules) != 1 or len(counts) != 1 or counts == {1}:
        return None
    (module,), (count,) = modules, counts
    expert_bytes = sum(tensor.numel for tensor in experts) // count * element_size
    total = sum(tensor.numel for tensor in tensors) * element_size
    return ExpertLayout(module, count, tuple(tensor.name for tensor in experts), expert_bytes,
                        total - expert_bytes * count)


def streamable(experts_module, layout: ExpertLayout, calls) -> bool:
    """Whether transformers' experts module can run one expert on its own: it holds the layout's experts and takes
    the arguments of its family's calling convention (`calls`, from ``expert_calls``)."""
    try:
        parameters = tuple(inspect.signature(type(experts_module).forward).parameters)[1:]
    except (TypeError, ValueError):
        return False
    return calls.takes(parameters) and getattr(experts_module, "num_experts", None) == layout.count


class RoutedCalls:
    """transformers 5's experts modules: (hidden_states, top_k_index, top_k_weights) per call, the index
    ``num_experts`` skipped."""

    def takes(self, parameters: tuple) -> bool:
        return parameters[:3] == ARGUMENTS

    def capture(self, session):
        experts = session.submodule(session.runner.expert_layouts[session.layer].module)
        return _Capture(tuple(inspect.signature(type(experts).forward).parameters)[1:4])

    def output(self, module, rows, chosen, weights, expert: int):
        """Expert `expert`'s share of the experts' output on a row chunk (its one-expert copy `module`)."""
        return module(rows, torch.where(chosen == expert, 0, 1).to(chosen.dtype), weights)

    def routed(self, rows, chosen, weights, expert: int):
        """(rows at weight 1, [routed (token, slot)] mask, gate weights) of the (token, slot)s routed to `expert`."""
        return rows, chosen == expert, weights

    def replay(self, total, route: list):
        return _Replay(total, route)


class RoutedRowsCalls(RoutedCalls):
    """gpt-oss's experts module: (hidden_states, router_indices, routing_weights), with no "no expert" index to send
    the other tokens to. Expert e's copy runs on the rows routed to it, in transformers' order (slot, then token),
    each with its gate weight; its output is added at those rows: the very products and additions of the plain
    pass, so bit for bit as the "routed" convention."""

    def takes(self, parameters: tuple) -> bool:
        return len(parameters) >= 3  # its own names for the three

    def output(self, module, rows, chosen, weights, expert: int):
        slot, token = torch.where((chosen == expert).t())
        out = rows.new_zeros(rows.shape)
        if len(token):
            index = torch.zeros((len(token), 1), dtype=chosen.dtype, device=chosen.device)
            out.index_add_(0, token, module(rows[token], index, weights[token, slot][:, None]))
        return out


class ScaledCalls:
    """Llama 4's experts module: every expert's copy of every token, scaled by its router score, in one call; the
    router's input and (scores, logits) are kept in its place (the E copies would be E times the tokens)."""

    def __init__(self, router: str, experts: int, top_k: int):
        self.router, self.experts, self.top_k = router, experts, top_k

    def takes(self, parameters: tuple) -> bool:
        return parameters[:1] == ("hidden_states",)

    def capture(self, session):
        return _RouterCapture(session.submodule(self.router), self.top_k)

    def output(self, module, rows, chosen, scores, expert: int):
        """Expert `expert` on the tokens routed to it, scaled as the block scales its copy of them; zero elsewhere,
        which is what it gives on the block's zero rows (a token it did not take has score 0, and its FFN has no
        bias): one expert's share of the compute instead of every token's."""
        token = (chosen == expert).any(dim=-1).nonzero().flatten()
        out = rows.new_zeros(rows.shape)
        if len(token):
            out[token] = module(rows[token] * scores[token, expert:expert + 1])
        return out

    def routed(self, rows, chosen, scores, expert: int):
        return rows, chosen == expert, scores.gather(-1, chosen)

    def replay(self, total, route: list):
        return _Replay(total, route, zeros=self.experts - 1)


def expert_calls(family, config: dict):
    """The calling convention of `family`'s experts module (``Family.experts_call``)."""
    if family.experts_call == "routed":
        return RoutedCalls()
    if family.experts_call == "routed_rows":
        return RoutedRowsCalls()
    dims = arch.dimensions(family, config)
    return ScaledCalls(router_path(family), dims["experts"], dims["top_k"])


def run_streamed(session, layout: ExpertLayout, hidden, probes, consume: bool, out):
    """The layer's full pass over every batch (see the module docstring); writes each batch's output to
    `out` (a HiddenStore) and returns it."""
    runner = session.runner
    calls = expert_calls(runner.weights.family, runner.weights.config)
    placement = runner.placement
    device, dtype = placement.device, placement.dtype
    experts = session._module.get_submodule(layout.module)
    attention_module = session.attention_module
    replay, session._attention = session._attention, None
    if replay is not None:  # the attention's output is replayed: its weights are not needed in this pass
        session.release(attention_module)
    watchers = [probe for probe in probes if probe.where == "expert_outputs"]
    probes = [probe for probe in probes if not probe.optional and probe.where != "expert_outputs"]
    kept = runner.store("attention") if replay is None else None
    inputs, sums = runner.store("experts-input"), runner.store("experts-output")
    routes: dict[int, list] = {}  # batch -> per row chunk: (tokens, top_k_index, top_k_weights)
    batches = range(len(runner.batches))
    with torch.no_grad():
        for index in batches:  # 1. capture
            capture = calls.capture(session)
            pieces = [] if kept is not None else None
            with capture:
                session.call(index, hidden.rows(index, device, dtype), (), attention=pieces, experts=capture,
                             replay=None if replay is None else replay.rows(index, device, dtype))
            if kept is not None:
                kept.put(index, pieces)
            inputs.put(index, [rows for rows, _, _ in capture.calls])
            shape = (sum(int(rows.shape[0]) for rows, _, _ in capture.calls), *capture.calls[0][0].shape[1:])
            sums.zeros(index, shape, dtype)
            routes[index] = [(int(rows.shape[0]), chosen, weights) for rows, chosen, weights in capture.calls]
            del capture, pieces  # the batch's rows are in the stores now
        session.release(attention_module)  # replayed from here on
        trim_heap()  # step 1's freed activations (peak 512 -> 505 MiB on bench_btx's budget row)
        for expert in range(layout.count):  # 2. one expert at a time, a row chunk at a time
            module = one_expert(experts, runner.load_expert(session.layer, layout, expert))
            for index in batches:
                start = 0
                for count, chosen, weights in routes[index]:
                    part = slice(start, start + count)
                    total = sums.get(index, device, dtype, part)
                    rows = inputs.get(index, device, dtype, part)
                    total += calls.output(module, rows, chosen, weights, expert)
                    sums.write(index, part, total)
                    if watchers:
                        _watch(watchers, index, expert, module, *calls.routed(rows, chosen, weights, expert),
                               runner.batches[index].attention_mask.reshape(-1)[part])
                    start += count
            del module
            trim_heap()  # the expert's compute's (its read: 510 -> 494 MiB)
        inputs.close()
        attention = replay if replay is not None else kept
        for index in batches:  # 3. the whole layer, the experts' output replayed
            replayed = calls.replay(sums.rows(index, device, dtype, last=True), routes.pop(index))
            out.put(index, session.call(index, hidden.rows(index, device, dtype, last=consume), probes,
                                        experts=replayed, replay=attention.rows(index, device, dtype, last=True),
                                        joined=False))
        attention.close()
        sums.close()
    return out


def _watch(watchers, index: int, expert: int, module, rows, routed, weights, real) -> None:
    """The "expert_outputs" probes: expert `expert`'s output (weight 1) on each of its real (token, slot)s
    (`routed`: the [tokens, top_k] mask of the slots routed to it; `weights`: their gate weights)."""
    token, slot = (routed & real.to(routed.device).bool()[:, None]).nonzero(as_tuple=True)
    if not len(token):
        return
    norms = expert_output_norms(module, rows[token], 0)  # the one-expert module's expert 0
    for watcher in watchers:
        watcher.consume(index, expert, norms, weights[token, slot])


class _Capture(contextlib.nullcontext):
    """In place of the experts' forward: keeps its first three arguments (the rows, the chosen experts and their
    weights, whatever the module names them: `names`) and stops the call."""

    def __init__(self, names: tuple = ARGUMENTS):
        super().__init__()
        self.calls: list = []
        self.names = names

    def __call__(self, *args, **kwargs):
        bound = dict(zip(self.names, args), **kwargs)
        self.calls.append(tuple(bound[name] for name in self.names))
        raise StopLayer


class _RouterCapture:
    """In place of Llama 4's experts' forward: stops the call; while entered, a hook on the router keeps its input
    (the tokens at weight 1), its scores and the experts it chose (its logits' top-k), as (rows, chosen, scores)."""

    def __init__(self, router, top_k: int):
        self.router, self.top_k, self.calls, self.handle = router, top_k, [], None

    def __enter__(self):
        def keep(_module, args, output):
            scores, logits = output[:2]
            self.calls.append((args[0], logits.topk(self.top_k, dim=-1).indices, scores))
        self.handle = self.router.register_forward_hook(keep)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def __call__(self, *args, **kwargs):
        raise StopLayer


class _Replay:
    """In place of the experts' forward: returns the experts' summed output of each row chunk in turn (followed by
    `zeros` row chunks of zeros, for a block that sums the experts' outputs itself)."""

    def __init__(self, total, route: list, zeros: int = 0):
        self.total, self.sizes, self.start, self.zeros = total, [count for count, _, _ in route], 0, zeros

    def __call__(self, *args, **kwargs):
        count = self.sizes.pop(0)
        self.start += count
        chunk = self.total[self.start - count:self.start]
        return torch.cat([chunk, chunk.new_zeros((count * self.zeros, *chunk.shape[1:]))]) if self.zeros else chunk

