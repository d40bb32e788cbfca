"""Router weights for a Branch-Train-MiX merge: zero, normal, embedding and calibrated.

Each expert of a BTX merge is the FFN of a model trained on one domain, so a good router sends
each domain's tokens to its own expert. The inits:

* ``zero``: every expert gets the same logit (uniform weights; top-k ties broken by index);
* ``normal``: N(0, 0.02) rows, seeded per layer;
* ``embedding``: every layer gets the same rows: the mean input embedding of each expert's
  calibration text, centred over the experts and scaled to unit length (an expert without text,
  e.g. an included seed, gets a zero row);
* ``calibrated``: the merge is written as a draft with these routers deferred, then the draft runs
  layer by layer on every expert's calibration text (each layer read once); at each layer the
  router's real input (``Family.router_input``, padding masked) is captured, that layer's router
  rows are fitted so that each domain's tokens go to its own expert (``fit_router``: ``logistic``
  or ``class-mean``), and the layer then runs with the fitted router, so the next layer sees what
  the merged model feeds it. Each layer runs once (its attention output kept from the stopped pass); the fitted
  rows are written into the draft, which then becomes the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from surgery import console
from surgery.errors import SurgeryError
from surgery.recipes import Deferred, Recipe


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
    shared_gates: dict[int, object] = field(default_factory=dict)  # layer -> FloatTensor[1, H] (shared expert's gate)
    gate_means: dict[int, tuple[float, float]] = field(default_factory=dict)  # layer -> mean gate on its text, on others

    def rows(self, kind: str) -> dict:
        return self.shared_gates if kind == "shared_gate" else self.routers


class LazyRouter(Recipe):
    """A router computed on first use (embedding init): dry runs stay free of weight reads."""

    def __init__(self, text: str, compute_fn):
        self.text = text
        self._compute_fn = compute_fn

    def describe(self):
        return self.text

    def compute(self):
        return self._compute_fn().clone()


class PendingRouter(Deferred):
    """A calibrated router (or the shared expert's gate: kind "shared_gate") in the plan: written once the draft
    of the merge has been run and fitted."""

    def __init__(self, text: str, layer: int, kind: str = "router"):
        super().__init__(text)
        self.layer = layer
        self.kind = kind


# ------------------------------------------------------------------ embedding init
def embedding_rows(embedding, tokenizer, domains: list[Domain], num_experts: int, max_tokens: int,
                   negatives: list[Domain] = ()):
    """[E, H]: centred, unit-length mean input embedding of each domain's text, minus that of its negative text
    where it has one (mergekit's cheap_embed: positive minus negative); zero rows for the rest."""
    import torch

    from surgery.samples import tokenize

    embedding = embedding.float()

    def mean(domain, what):
        ids = tokenize(tokenizer, domain.text)[:max_tokens]
        if not ids:
            raise SurgeryError(f"{what} of {domain.name} has no tokens")
        bad = [i for i in ids if i >= embedding.shape[0]]
        if bad:
            raise SurgeryError(f"{what} of {domain.name}: token id {bad[0]} is out of range for the "
                               f"embedding ({embedding.shape[0]} rows)")
        return embedding[torch.tensor(ids)].mean(0)

    means = {domain.expert: mean(domain, "calibration text") for domain in domains}
    for domain in negatives:
        means[domain.expert] = means[domain.expert] - mean(domain, "negative text")
    from surgery.execution.routers import centred_unit_rows

    return centred_unit_rows(means, num_experts, embedding.shape[1])


# ------------------------------------------------------------------ calibrated init
def calibration_parts(merge, tokenizer) -> list:
    """[(label, CalibrationSet)] of every text the fit runs, tokenized (and refused if unusable) before anything
    is written. Labels: expert i's text i; the shared expert's text E (the number of experts); the negative
    text of expert i E + 1 + i, of the shared expert 2E + 1."""
    from surgery.execution.calibration import CalibrationSet

    count, spec = len(merge.experts), merge.spec
    texts = [(d.expert, d, "calibration text") for d in merge.domains()]
    if merge.shared_gate == "fitted":
        name = merge.shared.name
        texts.append((count, Domain(count, name, spec.calibration[name].text), "calibration text"))
        if name in spec.negative:
            texts.append((2 * count + 1, Domain(count, name, spec.negative[name].text), "negative text"))
    texts += [(count + 1 + d.expert, d, "negative text") for d in merge.negative_domains()]
    return [(label, CalibrationSet.from_text(domain.text, tokenizer, merge.config, spec.calibration_tokens,
                                             f"{what} of {domain.name}"))
            for label, domain, what in texts]


def fit_calibrated(merge, weights, parts: list, settings, spill_dir=None, merged_inputs=None) -> RouterFit:
    """Every router of the merged model, fitted in layer order while the model runs layer by layer.

    `weights`: the merged model (the written draft, its routers still zero). At layer l every
    domain's tokens run up to the router's input (the pass stops there); the router rows are fitted
    (``fit_router``: each domain's tokens to its expert) and set in the layer; then the layer runs
    for real, with the fitted router, and its output feeds layer l + 1. `merged_inputs`
    (``merge_regmean.MergedInputs``, RegMean++): merges each layer's shared linear layers into the draft
    before that layer is read, and the head after the last.
    """
    import torch

    from surgery import families as arch
    from surgery.execution.calibration import CalibrationSet
    from surgery.execution.routers import fit_router, label_groups, routing_shares
    from surgery.execution.session import Collect, router_input_probe, runner_for
    from surgery.routing import router_path

    target, config = merge.target, merge.config
    calibration = CalibrationSet.combine(parts)
    runner = runner_for(weights, calibration.batches, settings, spill_dir, reuse_attention=True)
    num_experts = len(merge.experts)
    fit = RouterFit(tokens={domain.name: part.tokens for domain, (_, part) in zip(merge.domains(), parts)})

    def visit(layer, session, hidden):
        if not arch.is_moe_layer(target, config, layer):
            return None
        collect = Collect()
        session.run(hidden, [router_input_probe(target, collect)], stop_after=target.router_input)
        inputs, labels = collect.by_domain(calibration)
        routed, negatives, labels_all = inputs, None, labels
        if bool((labels >= num_experts).any()):  # shared expert's or negative text: apart from the experts' own
            mine, owners = labels < num_experts, labels - num_experts - 1
            avoid = (labels > num_experts) & (owners < num_experts)
            routed, negatives = inputs[mine], (inputs[avoid], owners[avoid])
            labels = labels[mine]
        rows = fit_router(merge.spec.router_fit, routed, rows=num_experts, targets=labels, negatives=negatives)
        session.set_parameter(router_path(target) + ".weight", rows)
        fit.routers[layer] = rows.float()
        fit.routing[layer] = routing_shares(label_groups(routed, labels), rows, merge.spec.top_k)
        if merge.shared_gate == "fitted":
            opens = (labels_all == num_experts).long()  # 1: the shared expert's text, 0: every other text
            pair = fit_router(merge.spec.router_fit, inputs, rows=2, targets=opens)
            gate = (pair[1] - pair[0]).unsqueeze(0)  # softmax over two rows = sigmoid of their difference
            session.set_parameter(shared_gate_path(target), gate)
            fit.shared_gates[layer] = gate.float()
            values = torch.sigmoid(inputs @ gate.float().T).squeeze(-1)
            fit.gate_means[layer] = (float(values[opens == 1].mean()), float(values[opens == 0].mean()))
        return None  # the layer then runs plainly, with the fitted router

    before = merged_inputs.before_layer if merged_inputs is not None else None
    head = merged_inputs is not None and merged_inputs.needs_head
    final, _ = runner.forward(visit, final_output=head, description="fitting routers", before_layer=before)
    if head:
        merged_inputs.head(final, runner)
        final.close()
    return fit


def shared_gate_path(family) -> str:
    """The shared expert gate's parameter inside a decoder layer as transformers holds it."""
    return family.memory_name(family.spec("shared_expert", "shared_gate").template.split("{layer}.", 1)[1])


def routing_table_text(fit: RouterFit, domain_names: list[str], expert_names: list[str]) -> str:
    """Markdown: per layer, the mean routing weight each expert gets on each domain's tokens."""
    lines = ["| layer | domain | " + " | ".join(expert_names) + " |",
             "|---|---|" + "---|" * len(expert_names)]
    for layer, shares in sorted(fit.routing.items()):
        for row, domain in enumerate(domain_names):
            cells = " | ".join(f"{100 * float(v):.0f}%" for v in shares[row])
            lines.append(f"| {layer} | {domain} | {cells} |")
    return "\n".join(lines) + "\n" + gate_text(fit)


def gate_text(fit: RouterFit) -> str:
    """Per layer, the mean of the fitted shared-expert gate on its own text and on the other texts."""
    if not fit.gate_means:
        return ""
    return "\nShared expert gate (sigmoid), mean on its own text / on the routed experts' text: " + ", ".join(
        f"layer {layer} {mine:.2f} / {others:.2f}" for layer, (mine, others) in sorted(fit.gate_means.items())) + "\n"


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
    if fit.gate_means:
        console.info(gate_text(fit).strip())
