"""Router weights for a Branch-Train-MiX merge: zero, normal, embedding and calibrated.

Each expert of a BTX merge is the FFN of a model trained on one domain, so a good router sends
each domain's tokens to its own expert. The inits (rows from the router registry):

* ``zero``: every expert gets the same logit (uniform weights; top-k ties broken by index);
* ``normal``: N(0, 0.02) rows, seeded per layer;
* ``embedding``: every layer gets the same rows: the mean input embedding of each expert's
  calibration text, centred over the experts and scaled to unit length (an expert without text,
  e.g. an included seed, gets a zero row);
* ``calibrated``: the merge is written as a draft with these routers deferred, then the draft runs
  layer by layer on every expert's calibration text (the layer pass; each layer read once); at each layer
  the router's real input (``Family.router_input``, padding masked) is captured, that layer's router
  rows are fitted so that each domain's tokens go to its own expert (``--router-fit``: ``logistic``
  or ``class-mean``), and the layer then runs with the fitted router, so the next layer sees what
  the merged model feeds it (``RouterFitting``). Each layer runs once (its attention output kept from the stopped
  pass); the fitted rows are written into the draft, which then becomes the output.

Calibration data is text (tokenised with the models' shared tokenizer) or token ids, per expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich.table import Table

from surgery import console
from surgery import families as arch
from surgery.btx.members import Domain, Merge, reference_tokenizer
from surgery.errors import SurgeryError
from surgery.execution.batches import tokenize
from surgery.execution.calibration import CalibrationSet
from surgery.execution.layer_pass import LayerPass
from surgery.execution.routers.classifier import label_groups
from surgery.execution.routers.measure import routing_shares
from surgery.execution.routers.registry import make
from surgery.execution.routers.request import RouterRequest
from surgery.execution.routing_stats import router_path
from surgery.execution.step import RouterInputs


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


# ------------------------------------------------------------------ calibration data
def _tokenizer(merge: Merge):
    """The models' tokenizer, where some calibration data is text (token ids need none)."""
    texts = [*merge.spec.calibration.values(), *merge.spec.negative.values()]
    return reference_tokenizer(merge) if any(data.text is not None for data in texts) else None


def _ids(domain: Domain, tokenizer, limit: int) -> list[int]:
    """A domain's token ids in reading order, at most `limit`: its text tokenised in one piece, or its token rows."""
    if domain.data.text is not None:
        return tokenize(tokenizer, domain.data.text)[:limit]
    return [token for row in domain.data.ids for token in row][:limit]


def _calibration(merge: Merge, domain: Domain, tokenizer, what: str) -> CalibrationSet:
    source, config, tokens = f"{what} of {domain.name}", merge.config, merge.spec.calibration_tokens
    if domain.data.text is not None:
        return CalibrationSet.from_text(domain.data.text, tokenizer, config, tokens, source)
    return CalibrationSet.from_token_rows(domain.data.ids, source, config, tokens)


def calibration_parts(merge: Merge) -> list:
    """[(label, CalibrationSet)] of every text the fit runs, tokenized (and refused if unusable) before anything
    is written. Labels: expert i's text i; the shared expert's text E (the number of experts); the negative
    text of expert i E + 1 + i, of the shared expert 2E + 1."""
    count, spec, tokenizer = len(merge.experts), merge.spec, _tokenizer(merge)
    texts = [(d.expert, d, "calibration text") for d in merge.domains()]
    if merge.shared_gate == "fitted":
        name = merge.shared.name
        texts.append((count, Domain(count, name, spec.calibration[name]), "calibration text"))
        if name in spec.negative:
            texts.append((2 * count + 1, Domain(count, name, spec.negative[name]), "negative text"))
    texts += [(count + 1 + d.expert, d, "negative text") for d in merge.negative_domains()]
    return [(label, _calibration(merge, domain, tokenizer, what)) for label, domain, what in texts]


# ------------------------------------------------------------------ embedding init
def embedding_rows(merge: Merge, embedding):
    """[E, H]: centred, unit-length mean input embedding of each domain's text, minus that of its negative text
    where it has one (mergekit's cheap_embed: positive minus negative); zero rows for the rest (the registry's
    ``embedding`` method on the embedding rows of each domain's tokens)."""
    tokenizer, limit = _tokenizer(merge), merge.spec.calibration_tokens
    embedding = embedding.float()

    def rows(domains, what):
        vectors, owners = [], []
        for domain in domains:
            ids = _ids(domain, tokenizer, limit)
            if not ids:
                raise SurgeryError(f"{what} of {domain.name} has no tokens")
            bad = [i for i in ids if i >= embedding.shape[0]]
            if bad:
                raise SurgeryError(f"{what} of {domain.name}: token id {bad[0]} is out of range for the "
                                   f"embedding ({embedding.shape[0]} rows)")
            vectors.append(embedding[torch.tensor(ids)])
            owners.append(torch.full((len(ids),), domain.expert, dtype=torch.long))
        return (torch.cat(vectors), torch.cat(owners)) if vectors else None

    inputs, labels = rows(merge.domains(), "calibration text")
    request = RouterRequest(len(merge.experts), embedding.shape[1], inputs=inputs, targets=labels,
                            negatives=rows(merge.negative_domains(), "negative text"))
    return make("embedding", request).rows


# ------------------------------------------------------------------ calibrated init
class RouterFitting(RouterInputs):
    """At each MoE layer of the merged draft: its router's inputs, on a pass stopped there; the rows fitted (each
    domain's tokens to its expert) and set in the layer, and the shared expert's gate, before the layer runs."""

    def __init__(self, merge: Merge, calibration: CalibrationSet, fit: RouterFit):
        super().__init__(merge.target, arch.moe_layers(merge.target, merge.config), fits_before_run=True)
        self.merge, self.calibration, self.fit_result, self.target = merge, calibration, fit, merge.target

    def fit(self, layer: int, session) -> None:
        merge, fit, num_experts = self.merge, self.fit_result, len(self.merge.experts)
        inputs, labels = self.collected().by_domain(self.calibration)
        hidden = int(inputs.shape[1])
        routed, negatives, labels_all = inputs, None, labels
        if bool((labels >= num_experts).any()):  # shared expert's or negative text: apart from the experts' own
            mine, owners = labels < num_experts, labels - num_experts - 1
            avoid = (labels > num_experts) & (owners < num_experts)
            routed, negatives = inputs[mine], (inputs[avoid], owners[avoid])
            labels = labels[mine]
        rows = make(merge.spec.router_fit, RouterRequest(num_experts, hidden, inputs=routed, targets=labels,
                                                         negatives=negatives)).rows
        session.set_parameter(router_path(self.target) + ".weight", rows)
        fit.routers[layer] = rows.float()
        fit.routing[layer] = routing_shares(label_groups(routed, labels), rows, merge.spec.top_k)
        if merge.shared_gate == "fitted":
            opens = (labels_all == num_experts).long()  # 1: the shared expert's text, 0: every other text
            gate = make("sigmoid-gate", RouterRequest(1, hidden, inputs=inputs, targets=opens,
                                                      via=merge.spec.router_fit)).rows
            session.set_parameter(shared_gate_path(self.target), gate)
            fit.shared_gates[layer] = gate.float()
            values = torch.sigmoid(inputs @ gate.float().T).squeeze(-1)
            fit.gate_means[layer] = (float(values[opens == 1].mean()), float(values[opens == 0].mean()))


def fit_calibrated(merge: Merge, weights, parts: list, settings, spill_dir=None, merged_inputs=None,
                   announce: str | None = None) -> RouterFit:
    """Every router of the merged model, fitted in layer order while the model runs layer by layer.

    `weights`: the merged model (the written draft, its routers still zero). At layer l every
    domain's tokens run up to the router's input (the pass stops there); the router rows are fitted
    (each domain's tokens to its expert) and set in the layer; then the layer runs for real, with the
    fitted router, and its output feeds layer l + 1. `merged_inputs` (``regmean.MergedInputs``, RegMean++), a
    step of the same pass: merges each layer's shared linear layers into the draft before that layer is read,
    and the head after the last. `announce`: the line said when the pass can run (``LayerPass.forward``).
    """
    calibration = CalibrationSet.combine(parts)
    layer_pass = LayerPass.for_settings(weights, calibration.batches, settings, spill_dir)
    fit = RouterFit(tokens={domain.name: part.tokens for domain, (_, part) in zip(merge.domains(), parts)})
    steps = [RouterFitting(merge, calibration, fit)] + ([merged_inputs] if merged_inputs is not None else [])
    head = merged_inputs is not None and merged_inputs.needs_head
    final = layer_pass.forward(steps, final_output=head, description="fitting routers", announce=announce)
    if final is not None:
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
