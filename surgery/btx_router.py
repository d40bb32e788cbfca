"""Router weights for a Branch-Train-MiX merge: zero, normal, embedding and calibrated.

Each expert of a BTX merge is the FFN of a model trained on one domain, so a good router sends
each domain's tokens to its own expert. The inits:

* ``zero``: every expert gets the same logit (uniform weights; top-k ties broken by index);
* ``normal``: N(0, 0.02) rows, seeded per layer;
* ``embedding``: every layer gets the same rows: the mean input embedding of each expert's
  calibration text, centred over the experts and scaled to unit length (an expert without text,
  e.g. an included seed, gets a zero row);
* ``calibrated``: layer by layer, the merged model as built so far runs on every expert's
  calibration text; the router's real input (the post-attention norm output, padding masked,
  ``surgery.calibration.router_inputs``) is captured; that layer's router rows are fitted so that
  each domain's tokens go to its own expert; the next layer is then captured with the new router
  in place. Fits: ``class-mean`` (centred class-mean directions with one scale fitted by
  cross-entropy) or ``logistic`` (multinomial logistic regression started from the class means).

The calibrated fit needs the merged model in memory (see ``surgery.btx_merge``); everything here
works on one layer's captured inputs at a time.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

from surgery import console
from surgery.errors import SurgeryError
from surgery.plan import Recipe

SMALL_FIT_ELEMENTS = 2**23  # calibration activations below this many numbers are fitted on one thread


@dataclass
class Domain:
    """Calibration text of one expert."""

    expert: int  # index of the expert its tokens should go to
    name: str
    text: str


@dataclass
class RouterFit:
    """Fitted router rows per layer, and where each domain's tokens went."""

    routers: dict[int, object] = field(default_factory=dict)  # layer -> FloatTensor[E, H]
    routing: dict[int, object] = field(default_factory=dict)  # layer -> FloatTensor[domains, E] (shares)
    tokens: dict[str, int] = field(default_factory=dict)  # domain -> calibration tokens used


class LazyRouter(Recipe):
    """A router computed on first use (embedding init): dry runs stay free of weight reads."""

    def __init__(self, text: str, compute_fn):
        self.text = text
        self._compute_fn = compute_fn

    def describe(self):
        return self.text

    def compute(self):
        return self._compute_fn().clone()


class PendingRouter(Recipe):
    """Placeholder of a calibrated router in the plan; replaced by a Constant once fitted."""

    def __init__(self, text: str):
        self.text = text

    def describe(self):
        return self.text

    def compute(self):
        raise AssertionError("calibrated router used before it was fitted")


def calibration_batches(tokenizer, text: str, max_tokens: int, vocab_size: int | None = None, seq_len: int = 256,
                        batch_size: int = 8) -> list:
    from surgery.samples import text_batches

    return list(text_batches(tokenizer, text, batch_size=batch_size, seq_len=seq_len, max_tokens=max_tokens,
                             vocab_size=vocab_size))


# ------------------------------------------------------------------ embedding init
def embedding_rows(embedding, tokenizer, domains: list[Domain], num_experts: int, max_tokens: int):
    """[E, H]: centred, unit-length mean input embedding of each domain's text (zero rows for the rest)."""
    import torch

    from surgery.samples import tokenize

    embedding = embedding.float()
    means = {}
    for domain in domains:
        ids = tokenize(tokenizer, domain.text)[:max_tokens]
        if not ids:
            raise SurgeryError(f"calibration text of {domain.name} has no tokens")
        bad = [i for i in ids if i >= embedding.shape[0]]
        if bad:
            raise SurgeryError(f"calibration text of {domain.name}: token id {bad[0]} is out of range for the "
                               f"embedding ({embedding.shape[0]} rows)")
        means[domain.expert] = embedding[torch.tensor(ids)].mean(0)
    return _centred_unit_rows(means, num_experts, embedding.shape[1])


def _centred_unit_rows(means: dict, num_experts: int, hidden: int):
    import torch

    rows = torch.zeros(num_experts, hidden)
    centre = torch.stack(list(means.values())).mean(0)
    for expert, mean in means.items():
        direction = mean - centre if len(means) > 1 else mean
        rows[expert] = direction / direction.norm().clamp_min(1e-12)
    return rows


# ------------------------------------------------------------------ calibrated init
@contextmanager
def _threads_for(elements: int):
    """One thread for small fits: thousands of tiny ops cost more in thread hand-offs than they save."""
    import torch

    previous = torch.get_num_threads()
    if elements < SMALL_FIT_ELEMENTS:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fit_layer(inputs: dict[int, object], num_experts: int, method: str = "logistic", steps: int = 50,
              l2: float = 1e-4):
    with _threads_for(sum(int(x.numel()) for x in inputs.values())):
        return _fit_layer(inputs, num_experts, method, steps, l2)


def _fit_layer(inputs, num_experts, method, steps, l2):
    """Router rows [E, H] sending tokens of inputs[expert] ([T, H]) to that expert.

    class-mean: rows = s * (mean_e - mean over experts) / |..|, one scale s fitted by balanced cross-entropy.
    logistic: multinomial logistic regression (balanced over domains, L2 `l2`), L-BFGS from the class-mean rows.
    Experts without inputs keep a zero row (logit 0).
    """
    import torch

    experts = sorted(inputs)
    hidden = next(iter(inputs.values())).shape[1]
    means = {e: inputs[e].mean(0) for e in experts}
    direction = _centred_unit_rows(means, num_experts, hidden)
    features = torch.cat([inputs[e] for e in experts])
    labels = torch.cat([torch.full((len(inputs[e]),), e, dtype=torch.long) for e in experts])
    weights = torch.cat([torch.full((len(inputs[e]),), 1.0 / (len(inputs[e]) * len(experts))) for e in experts])
    active = torch.zeros(num_experts, 1)
    active[experts] = 1.0

    def loss_of(rows):
        logits = features @ rows.T
        return (torch.nn.functional.cross_entropy(logits, labels, reduction="none") * weights).sum()

    scale = torch.zeros((), requires_grad=True)  # log of the scale of the class-mean rows
    optimizer = torch.optim.LBFGS([scale], lr=1, max_iter=30, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_of(direction * scale.exp())
        loss.backward()
        return loss

    optimizer.step(closure)
    rows = (direction * scale.detach().exp()).clone()
    if method == "class-mean":
        return rows
    if method != "logistic":
        from surgery.merge_config import ROUTER_FITS

        raise SurgeryError(f"router fit {method!r} is not one of {', '.join(ROUTER_FITS)}")
    rows.requires_grad_(True)
    optimizer = torch.optim.LBFGS([rows], lr=1, max_iter=steps, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure_rows():
        optimizer.zero_grad()
        masked = rows * active
        loss = loss_of(masked) + l2 * masked.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure_rows)
    return (rows.detach() * active).contiguous()


def routing_shares(inputs: dict[int, object], rows, top_k: int):
    """[domains, E]: mean routing weight each expert gets on each domain's tokens (rows sum to 1).

    The weights are those of the MoE block: softmax over all experts, top-k kept and renormalised.
    """
    import torch

    out = torch.zeros(len(inputs), rows.shape[0])
    for row, expert in enumerate(sorted(inputs)):
        probabilities = torch.softmax(inputs[expert] @ rows.T, dim=-1)
        top = torch.topk(probabilities, top_k, dim=-1)
        weights = torch.zeros_like(probabilities).scatter_(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
        out[row] = weights.mean(0)
    return out


class _StopForward(Exception):
    """Raised by a hook once the captured layer has run: later layers are not needed."""


def layer_router_inputs(model, batches, layer: int):
    """FloatTensor[tokens, hidden]: the post-attention norm output of `layer`, padding removed.

    The same tensor as ``surgery.calibration.router_inputs(model, batches, [layer])``, but each
    forward pass stops right after that norm, so fitting layer l costs l + 1 layers, not all.
    """
    import torch

    from surgery.calibration import capture_outputs, decoder_layers

    module = decoder_layers(model)[layer].post_attention_layernorm
    device = next(model.parameters()).device
    collected = []

    def stop(_module, _inputs, _output):
        raise _StopForward

    with torch.no_grad(), capture_outputs({layer: module}) as captured:
        handle = module.register_forward_hook(stop)  # runs after the capture hook
        try:
            for batch in batches:
                try:
                    model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
                except _StopForward:
                    pass
                value = captured[layer].pop()
                keep = batch.attention_mask.reshape(-1).bool().to(device)
                collected.append(value.reshape(-1, value.shape[-1])[keep].float().cpu())
        finally:
            handle.remove()
    if not collected:
        raise SurgeryError("calibration text produced no tokens")
    return torch.cat(collected)


def router_parameter(model, layer: int, num_experts: int):
    """The in-memory router weight [E, H] of decoder layer `layer` (transformers module, not a file name)."""
    from surgery.calibration import decoder_layers

    module = decoder_layers(model)[layer]
    hidden = model.config.hidden_size
    candidates = [(name, parameter) for name, parameter in module.named_parameters()
                  if "attn" not in name and tuple(parameter.shape) == (num_experts, hidden)]
    if len(candidates) != 1:
        raise SurgeryError(f"{type(model).__name__}: cannot find the router of layer {layer} "
                           f"(weights of shape [{num_experts}, {hidden}]: {[n for n, _ in candidates]})")
    return candidates[0][1]


def fit_calibrated(model, batches: dict[int, list], num_experts: int, top_k: int, method: str = "logistic",
                   names: dict[int, str] | None = None) -> RouterFit:
    """Fit every layer's router in order on the merged `model` (routers are set in place as they are fitted).

    `batches`: expert index -> calibration batches of that expert's domain.
    """
    import torch

    from surgery.calibration import decoder_layers

    fit = RouterFit()
    layers = len(decoder_layers(model))
    parameters = sum(int(p.numel()) for p in model.parameters())
    with _threads_for(parameters), console.progress("fitting routers", layers, unit_bytes=False) as advance:
        for layer in range(layers):
            inputs = {expert: layer_router_inputs(model, domain_batches, layer)
                      for expert, domain_batches in sorted(batches.items())}
            rows = fit_layer(inputs, num_experts, method)
            with torch.no_grad():
                parameter = router_parameter(model, layer, num_experts)
                parameter.copy_(rows.to(parameter.dtype))
            fit.routers[layer] = rows.to(torch.float32)
            fit.routing[layer] = routing_shares(inputs, rows, top_k)
            advance(1, f"layer {layer}")
    for expert, domain_batches in batches.items():
        fit.tokens[(names or {}).get(expert, str(expert))] = sum(batch.tokens for batch in domain_batches)
    return fit


def routing_table_text(fit: RouterFit, domain_names: list[str], expert_names: list[str]) -> str:
    """Markdown: per layer, the mean routing weight each expert gets on each domain's tokens."""
    lines = ["| layer | domain | " + " | ".join(expert_names) + " |",
             "|---|---|" + "---|" * len(expert_names)]
    for layer, shares in sorted(fit.routing.items()):
        for row, domain in enumerate(domain_names):
            cells = " | ".join(f"{100 * float(v):.0f}%" for v in shares[row])
            lines.append(f"| {layer} | {domain} | {cells} |")
    return "\n".join(lines) + "\n"


def print_routing(fit: RouterFit, domain_names: list[str], expert_names: list[str]) -> None:
    from rich.table import Table

    table = Table(title="routing: mean weight per expert on each domain's tokens", header_style="bold")
    table.add_column("layer", justify="right")
    table.add_column("domain")
    for name in expert_names:
        table.add_column(name, justify="right")
    for layer, shares in sorted(fit.routing.items()):
        for row, domain in enumerate(domain_names):
            table.add_row(str(layer), domain, *[f"{100 * float(v):.0f}%" for v in shares[row]])
    console.console.print(table)
