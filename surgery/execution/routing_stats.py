"""Per-layer routing statistics of an MoE model, measured with forward hooks on its routers.

For every MoE layer, on the real (unpadded) tokens of the batches:

- ``share``: the fraction of the top-k assignments that go to each expert (sums to 1);
- ``mean_probability``: the router's softmax probability of each expert, averaged over tokens (p_i);
- ``load_entropy``: entropy (nats) of ``share``; ``log(N)`` when the load is perfectly balanced;
- ``router_entropy``: mean per-token entropy (nats) of the router's softmax over all N experts;
- ``unused_experts``: experts that receive no token;
- ``load_balancing_loss``: Switch / BTX ``alpha * N * sum_i u_i * p_i`` with u_i = ``share``;
  it equals ``alpha`` for a uniform router, and grows toward ``alpha * N`` as the load collapses
  onto one expert that also takes all the probability mass;
- ``router_z_loss``: ST-MoE z-loss, mean over tokens of ``logsumexp(router logits) ** 2``
  (unweighted; ST-MoE multiplies it by 1e-3 in training).

The hooks only accumulate sums (counts, probabilities, entropies), so memory stays bounded by one
batch however many batches are measured. Which module is the router is asked of the architecture
table (``router_path``: the router as transformers holds it, ``mlp.gate``). A model run layer by
layer gets the same sums through one probe per MoE layer (``RoutingSums``).
"""

from __future__ import annotations

import copy
import inspect
import math

import torch

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.execution.probes import Probe
from surgery.execution.step import Step

LOAD_BALANCING_ALPHA = 0.01  # BTX (Sukhbaatar et al. 2024) and Switch Transformer


def model_family(model):
    config = model.config.to_dict()
    return arch.detect_family(config, f"{type(model).__name__}.config"), config


def router_path(family) -> str:
    """The router's module path inside a decoder layer as transformers holds it (``mlp.gate``)."""
    spec = family.fused_router or family.router
    return family.memory_name(spec.template.split("{layer}.", 1)[1]).removesuffix(".weight")


def router_modules(model) -> dict[int, object]:
    """{layer: router module} for every MoE layer of a transformers model ({} for a dense model)."""
    family, config = model_family(model)
    if family.kind != "moe":
        return {}
    dims = arch.dimensions(family, config, f"{type(model).__name__}.config")
    routers = {}
    for layer, module in enumerate(model.get_submodule(arch.L.split(".{layer}")[0])):
        if not arch.is_moe_layer(family, config, layer):
            continue
        try:
            found = module.get_submodule(router_path(family))
        except AttributeError:
            found = None
        weight = getattr(found, "weight", None)
        if weight is None or tuple(weight.shape) != (dims["experts"], dims["hidden"]):
            raise SurgeryError(f"{type(model).__name__}: layer {layer} should be an MoE layer, but it has no router "
                               f"{router_path(family)!r} with weight [{dims['experts']}, {dims['hidden']}]")
        routers[layer] = found
    return routers


class RoutingSums(Step):
    """Routing statistics of a model run layer by layer: a step of the layer pass, one probe per MoE layer on its
    router's output."""

    def __init__(self, family, config: dict, alpha: float = LOAD_BALANCING_ALPHA):
        self.family, self.config, self.alpha = family, config, alpha
        self.sums = {}
        if family.kind == "moe":
            dims = arch.dimensions(family, config)
            self.sums = {layer: LayerRouting(dims["experts"], dims["top_k"]) for layer in range(dims["layers"])
                         if arch.is_moe_layer(family, config, layer)}

    def wants(self, layer: int) -> bool:
        return layer in self.sums

    def probes(self, layer: int, session=None) -> list:
        top_k = self.sums[layer].top_k
        return [Probe(router_path(self.family), "outputs", lambda _batch, *routed:
                      self.sums[layer].add(*arch.routing_of(self.family, routed, top_k)))]

    def results(self) -> list[dict]:
        return [self.sums[layer].result(layer, self.alpha) for layer in sorted(self.sums)]


class LayerRouting:
    """The routing sums of one MoE layer over the real tokens it saw (updated per forward call), the one
    routing-statistics collector: each token's top-k experts, from the router's softmax, counted per expert; the
    softmax probabilities, entropy and z-loss; and, given the experts module and its input, the REAP sums (gate
    weight x expert output norm, renormalised over the top-k where the family's router does) that ``surgery
    prune`` scores experts by."""

    def __init__(self, experts: int, top_k: int, renormalise: bool = True):
        self.experts, self.top_k, self.renormalise = experts, top_k, renormalise
        self.tokens = 0
        self.counts = torch.zeros(experts, dtype=torch.float64)
        self.probability = torch.zeros(experts, dtype=torch.float64)
        self.entropy = 0.0
        self.z = 0.0
        self.reap = torch.zeros(experts, dtype=torch.float64)
        self.norm = torch.zeros(experts, dtype=torch.float64)

    def add(self, logits, weights=None, indices=None, hidden=None, experts_module=None, outputs=None) -> None:
        """One call's real tokens: their router `logits`, and the gate `weights` and expert `indices` the router
        chose (transformers' routers return all three: the model's own routing, whatever its scoring, bias or
        groups; computed here as softmax and top-k where a router does not say); with `hidden` and
        `experts_module`, each routed expert's output on its tokens too: read from `outputs` ((top_k_index,
        norms), both [tokens, top_k], as ``ExpertOutputs`` recorded them in the layer's own pass) where the
        experts module was given the router's very choice, else run here."""
        logits = logits.float()
        probs = torch.softmax(logits, dim=-1)
        renormalise = False
        routed = indices is not None and not indices.dtype.is_floating_point
        if not routed:
            weights, indices = torch.topk(probs, self.top_k, dim=-1)
            renormalise = self.renormalise
        self.tokens += logits.shape[0]
        self.counts += torch.bincount(indices.reshape(-1), minlength=self.experts).double().cpu()
        self.probability += probs.sum(0).double().cpu()
        log_probs = torch.log_softmax(logits, dim=-1)
        self.entropy += float(-(probs * log_probs).sum(-1).double().sum())
        self.z += float(torch.logsumexp(logits, dim=-1).double().pow(2).sum())
        if renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if experts_module is not None:
            self.add_outputs(weights, indices, hidden, experts_module, outputs if routed else None)
        return weights, indices

    def add_outputs(self, weights, indices, hidden, experts_module, outputs=None) -> None:
        """The REAP sums of one call's real tokens routed to `indices` with gate `weights`: from `outputs` (see
        ``add``) where they were recorded for this very choice, else each expert run here on its tokens."""
        if outputs is not None and torch.equal(outputs[0].to(indices.device), indices):
            self._add_norms(indices, weights, outputs[1].to(indices.device))
        else:
            self._add_outputs(hidden, indices, weights, experts_module)

    def add_expert(self, expert: int, norms, gate) -> None:
        """The REAP sums of one expert's real (token, slot)s: its output norms and their gate weights (what
        ``expert_stream`` gives while it reads the experts one at a time)."""
        self.norm[expert] += float(norms.double().sum())
        self.reap[expert] += float((gate.double() * norms.double()).sum())

    def _add_norms(self, chosen, weights, norms) -> None:
        """The REAP sums from each (token, slot)'s expert output norm (`norms`, [tokens, top_k])."""
        flat, norms = chosen.reshape(-1), norms.reshape(-1).double()
        self.norm += torch.bincount(flat, weights=norms, minlength=self.experts).cpu()
        self.reap += torch.bincount(flat, weights=weights.reshape(-1).double() * norms, minlength=self.experts).cpu()

    def _add_outputs(self, hidden, chosen, weights, experts_module) -> None:
        """Each routed expert on its tokens (transformers' experts module, every token sent to that expert with
        weight 1): the sum of its output norms, and of gate weight x output norm."""
        for expert in chosen.unique().tolist():
            token, slot = (chosen == expert).nonzero(as_tuple=True)
            norms = expert_output_norms(experts_module, hidden[token], expert).double()
            self.norm[expert] += float(norms.sum())
            self.reap[expert] += float((weights[token, slot].double() * norms).sum())

    def share(self):
        """The fraction of the top-k slots each expert took."""
        return self.counts / self.counts.sum()

    def scores(self) -> dict:
        """What ``surgery prune`` ranks experts by: routed tokens, frequency, mean output norm (activation) and
        mean gate weight x output norm (reap) over the tokens routed to each expert (None: no token)."""
        def mean(sums):
            return [float(s / c) if c > 0 else None for s, c in zip(sums.tolist(), self.counts.tolist())]

        return {"tokens": self.tokens, "routed": [int(c) for c in self.counts.tolist()],
                "frequency": [float(c / self.tokens) for c in self.counts.tolist()],
                "activation": mean(self.norm), "reap": mean(self.reap)}

    def result(self, layer: int, alpha: float) -> dict:
        if self.tokens == 0:
            raise SurgeryError(f"layer {layer}: the router saw no real token (empty batches?)")
        share = self.share()
        mean_probability = self.probability / self.tokens
        nonzero = share[share > 0]
        return {
            "layer": layer,
            "experts": self.experts,
            "top_k": self.top_k,
            "tokens": self.tokens,
            "share": [float(v) for v in share],
            "mean_probability": [float(v) for v in mean_probability],
            "load_entropy": float(-(nonzero * nonzero.log()).sum()),
            "max_entropy": math.log(self.experts),
            "router_entropy": self.entropy / self.tokens,
            "unused_experts": [expert for expert in range(self.experts) if self.counts[expert] == 0],
            "load_balancing_loss": alpha * self.experts * float((share * mean_probability).sum()),
            "load_balancing_alpha": alpha,
            "router_z_loss": self.z / self.tokens,
        }


def one_expert(experts, state: dict):
    """A copy of transformers' experts module holding one expert (`state`: its [1, ...] tensors, by name or by a
    path ending in the name): the same forward, with index 1 as its "no expert"."""
    leaves = {name.rpartition(".")[2]: value for name, value in state.items()}
    module = copy.copy(experts)
    module._parameters = {name: torch.nn.Parameter(leaves[name], requires_grad=False) if name in leaves else value
                          for name, value in experts._parameters.items()}
    module.num_experts = 1
    return module


def expert_output_norms(experts_module, rows, expert: int):
    """‖output‖₂ of expert `expert` of transformers' experts module on each of `rows`, every row sent to it with
    weight 1 (float32, [rows]). transformers 5's modules take (rows, chosen experts, weights); Llama 4's takes every
    expert's rows back to back, so its own forward runs on a copy holding expert `expert` alone."""
    if len(list(inspect.signature(type(experts_module).forward).parameters)) == 2:  # (self, hidden_states)
        one = one_expert(experts_module, {name: value[expert:expert + 1]
                                          for name, value in experts_module._parameters.items()})
        return type(experts_module).forward(one, rows).float().norm(dim=-1)  # its own forward, not a stand-in
    index = torch.full((len(rows), 1), expert, dtype=torch.long, device=rows.device)
    ones = torch.ones((len(rows), 1), dtype=rows.dtype, device=rows.device)
    return experts_module(rows, index, ones).float().norm(dim=-1)


class ExpertOutputs:
    """In place of transformers' experts module's forward in a scoring pass, so that each routed expert runs once:
    its output on its tokens is both the REAP norm and its share of the layer's output.

    Per call, transformers' own forward (the eager per-expert loop) runs once on every (token, slot)'s row sent to
    its expert with weight 1, rows grouped by expert in transformers' order (slot, then token: the very matrices
    its own loop multiplies); each row's output norm is kept for the step (``take``); then the layer's output is
    formed as that loop forms it, each expert's rows times their gate weights added into zeros in increasing expert
    order. The layer's output is therefore bit-identical to the plain pass (tested). Only where the experts
    module runs transformers' eager loop on [tokens, hidden] rows (``applies``); elsewhere its own forward runs and
    the REAP sums run each expert again (``LayerRouting._add_outputs``)."""

    def __init__(self, module):
        self.module, self.forward = module, type(module).forward
        self.calls: list = []  # per call: (top_k_index, norms [tokens, top_k]), or None where the forward ran as is

    @staticmethod
    def applies(module) -> bool:
        """Whether `module` is a transformers 5 experts module running its eager loop: (hidden_states,
        top_k_index, top_k_weights), ``num_experts``, no other kernel chosen in its config."""
        implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
        try:
            parameters = list(inspect.signature(type(module).forward).parameters)[1:]
        except (TypeError, ValueError):
            return False
        return implementation in (None, "eager") and len(parameters) == 3 and \
            isinstance(getattr(module, "num_experts", None), int)

    def take(self) -> tuple | None:
        """(top_k_index, norms) of the calls since the last ``take``, joined in call order (None: some call's
        norms were not recorded)."""
        calls, self.calls = self.calls, []
        if not calls or any(call is None for call in calls):
            return None
        return torch.cat([index for index, _ in calls]), torch.cat([norms for _, norms in calls])

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        module = self.module
        if hidden_states.dim() != 2 or top_k_index.dim() != 2 or top_k_index.dtype.is_floating_point:
            self.calls.append(None)
            return self.forward(module, hidden_states, top_k_index, top_k_weights)
        tokens, top_k = top_k_index.shape
        flat = top_k_index.t().reshape(-1)  # slot-major: transformers' torch.where over its [expert, slot, token] mask
        order = torch.argsort(flat, stable=True)
        experts = flat[order]
        order, experts = order[experts < module.num_experts], experts[experts < module.num_experts]
        slot, token = order // tokens, order % tokens
        rows = hidden_states[token]
        ones = torch.ones((len(token), 1), dtype=rows.dtype, device=rows.device)
        outputs = self.forward(module, rows, experts[:, None], ones)  # row i: its expert's output, weight 1
        norms = torch.zeros(top_k * tokens, dtype=torch.float32, device=rows.device)
        norms[order] = outputs.float().norm(dim=-1)
        self.calls.append((top_k_index, norms.view(top_k, tokens).t()))
        final = torch.zeros_like(hidden_states)
        start = 0
        for count in torch.bincount(experts, minlength=module.num_experts).tolist():
            if count:
                part = slice(start, start + count)
                weighted = outputs[part] * top_k_weights[token[part], slot[part], None]
                final.index_add_(0, token[part], weighted.to(final.dtype))
                start += count
        return final


class RoutingCollector:
    """Hooks on every router of `model`; call ``set_mask(attention_mask)`` before each forward.

    Use as a context manager; ``results()`` gives one dict per MoE layer (see the module doc).
    """

    def __init__(self, model, alpha: float = LOAD_BALANCING_ALPHA, strict: bool = True):
        """`strict=False`: a model whose architecture is not in the table gets no hooks instead of an error."""
        self.alpha = alpha
        self._keep = None
        self._handles = []
        try:
            family, config = model_family(model)
        except SurgeryError:
            if strict:
                raise
            family = None
        self.routers, dims, self.family = {}, {}, family
        if family is not None and family.kind == "moe":
            dims = arch.dimensions(family, config, f"{type(model).__name__}.config")
            self.routers = router_modules(model)
        self.sums = {layer: LayerRouting(dims["experts"], dims["top_k"]) for layer in self.routers}

    def set_mask(self, attention_mask) -> None:
        self._keep = attention_mask.reshape(-1).bool()

    def _hook(self, layer):
        def hook(_module, _inputs, output):
            routed = arch.routing_of(self.family, output, self.sums[layer].top_k) if isinstance(output, tuple) \
                else (output,)
            logits, weights, indices = (tuple(routed) + (None, None))[:3]
            logits = logits.reshape(-1, logits.shape[-1])
            keep = self._keep
            if keep is None or keep.numel() != logits.shape[0]:
                raise SurgeryError(f"layer {layer}: the router saw {logits.shape[0]} tokens, but the attention "
                                   f"mask has {None if keep is None else keep.numel()} (set_mask before each forward)")
            keep = keep.to(logits.device)
            if indices is not None and indices.dtype.is_floating_point:
                weights = indices = None
            chosen = [None if t is None else t.reshape(logits.shape[0], -1)[keep].detach() for t in (weights, indices)]
            self.sums[layer].add(logits[keep].detach(), *chosen)
        return hook

    def __enter__(self):
        self._handles = [router.register_forward_hook(self._hook(layer)) for layer, router in self.routers.items()]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def results(self) -> list[dict]:
        return [self.sums[layer].result(layer, self.alpha) for layer in sorted(self.sums)]


def routing_statistics(model, batches, alpha: float = LOAD_BALANCING_ALPHA) -> list[dict]:
    """One dict per MoE layer (empty list for a dense model); `batches` yield ``Batch`` objects."""
    collector = RoutingCollector(model, alpha)
    if not collector.routers:
        return []
    device = next(model.parameters()).device
    with torch.inference_mode(), collector:
        for batch in batches:
            collector.set_mask(batch.attention_mask)
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    return collector.results()
