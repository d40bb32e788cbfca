"""Probes: what a pass of the batches through one decoder layer lets its caller see.

A ``Probe`` names a module inside the layer, its input or output, and who consumes the rows (real
tokens only; in a backward pass with their gradients). ``probe_hooks`` attaches probes to the layer's
modules for one call (and can stop the pass, ``StopLayer``, once a module's input has been seen);
``gathered_probes`` collects the row chunks of a batch so that each probe receives the batch once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Probe:
    """What to see in each batch's pass through a layer, on real (unpadded) tokens only.

    `module`: a path inside the decoder layer ("" = the layer itself); `where`: its "input" or
    "output"; `consume(batch, rows)` receives a [real tokens, features] tensor on the device; "outputs":
    `consume(batch, *rows)` receives every tensor of the module's output tuple (a router's logits, weights and
    chosen experts), each as [real tokens, features]; "expert_outputs" (on the experts module, served where the
    layer's experts are read one at a time, ``expert_stream``): `consume(batch, expert, norms, gate)` receives,
    for every real (token, slot) routed to `expert`, the norm of the expert's output on it (weight 1) and its gate
    weight. In a backward pass `consume(batch, rows, grad_rows)` also receives the loss gradient of that tensor.
    `optional`: a probe the pass drops when it reads the experts one at a time (an "expert_outputs" probe then
    gives what it gave), so that it does not keep the experts in memory together.
    """

    module: str
    where: str
    consume: Callable
    optional: bool = False


class StopLayer(Exception):
    """Raised once a capture-only pass has seen what it needs."""


@contextlib.contextmanager
def gathered_probes(probes, index: int, with_grad: bool = False):
    """Stand-in probes that collect a batch's pieces (one per row chunk); each real probe then receives the
    whole batch once, in row order, when the block ends."""
    pieces = [[] for _ in probes]

    def collector(number):
        if with_grad:
            return lambda _batch, rows, grads: pieces[number].append((rows, grads))
        return lambda _batch, *rows: pieces[number].append(rows)

    yield [Probe(probe.module, probe.where, collector(number), probe.optional) for number, probe in enumerate(probes)]
    for probe, parts in zip(probes, pieces):
        if parts:
            probe.consume(index, *(torch.cat([part[i] for part in parts]) for i in range(len(parts[0]))))


@contextlib.contextmanager
def probe_hooks(module, probes, keep, stop_after: str | None, with_grad: bool = False):
    """Forward hooks of `probes` on `module`'s submodules for one call (its real tokens: `keep`)."""
    handles = []

    def rows(value):
        return value.reshape(-1, value.shape[-1])[keep]

    def attach(probe):
        target = module.get_submodule(probe.module) if probe.module else module

        def see(value):
            if probe.where == "outputs":
                values = value if isinstance(value, tuple) else (value,)
                probe.consume(None, *(rows(item.detach()) for item in values if isinstance(item, torch.Tensor)))
                return
            value = value[0] if isinstance(value, tuple) else value
            if with_grad:
                if value.requires_grad:
                    saved = value.detach()
                    value.register_hook(lambda g: probe.consume(None, rows(saved), rows(g)))
            else:
                probe.consume(None, rows(value.detach()))

        if probe.where == "input":
            handles.append(target.register_forward_pre_hook(lambda _m, args, kwargs: see(args[0] if args else next(iter(kwargs.values()))),
                                                            with_kwargs=True))
        else:
            handles.append(target.register_forward_hook(lambda _m, _args, output: see(output)))

    for probe in probes:
        if probe.where != "expert_outputs":  # served by expert_stream, not by a hook
            attach(probe)
    if stop_after is not None:
        def stop(_m, _args):
            raise StopLayer
        handles.append(module.get_submodule(stop_after).register_forward_pre_hook(stop))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
