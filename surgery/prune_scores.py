"""Expert scores for `surgery prune`: one calibrated pass over an MoE, or a scores file from an earlier one.

Per MoE layer and routed expert, on the real calibration tokens (see docs/prune.md):

* ``frequency``: the share of tokens routed to the expert (its top-k slots over the tokens);
* ``activation``: the mean of ‖expert output‖₂ over the tokens routed to it;
* ``reap``: the mean over the same tokens of gate weight × ‖expert output‖₂ (REAP);
* ``random``: seeded uniform draws (``surgery.seeds``), no calibration.

The routing is the model's own: each token's top-k experts and gate weights come from the router's
logits (softmax, top-k, renormalised where the family's router does: ``Family.top_k_norm``). The
expert output is transformers' own experts module called on the tokens routed to one expert, all sent
to that expert with weight 1. One pass computes every calibrated criterion; ``--save-scores`` keeps
them so that another criterion or ``--dry-run`` reuses the pass (``--scores``).
"""

from __future__ import annotations

import json
from pathlib import Path

from surgery import families as arch
from surgery.errors import SurgeryError

CRITERIA = ("reap", "frequency", "activation", "random")
CALIBRATED = ("reap", "frequency", "activation")
FORMAT = "surgery-prune-scores/1"


def moe_layers(family, config: dict) -> list[int]:
    dims = arch.dimensions(family, config)
    return [layer for layer in range(dims["layers"]) if arch.is_moe_layer(family, config, layer)]


def random_scores(family, config: dict, seed: int) -> dict[int, list[float]]:
    from surgery.seeds import generator

    experts = arch.dimensions(family, config)["experts"]
    return {layer: [float(v) for v in generator(seed, "prune", layer).random(experts)]
            for layer in moe_layers(family, config)}


class _LayerSums:
    """Running sums of one layer: routed tokens, gate weights × output norms, output norms, per expert."""

    def __init__(self, experts: int, top_k: int, renormalise: bool):
        import torch

        self.experts, self.top_k, self.renormalise = experts, top_k, renormalise
        self.tokens = 0
        self.count = torch.zeros(experts, dtype=torch.float64)
        self.reap = torch.zeros(experts, dtype=torch.float64)
        self.norm = torch.zeros(experts, dtype=torch.float64)

    def add(self, hidden, logits, experts_module) -> None:
        import torch

        probabilities = torch.softmax(logits.float(), dim=-1)
        weights, chosen = torch.topk(probabilities, self.top_k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        self.tokens += int(hidden.shape[0])
        self.count += torch.bincount(chosen.reshape(-1), minlength=self.experts).double().cpu()
        for expert in chosen.unique().tolist():
            token, slot = (chosen == expert).nonzero(as_tuple=True)
            rows = hidden[token]
            index = torch.full((len(token), 1), expert, dtype=torch.long, device=rows.device)
            ones = torch.ones((len(token), 1), dtype=rows.dtype, device=rows.device)
            norms = experts_module(rows, index, ones).float().norm(dim=-1).double()
            self.norm[expert] += float(norms.sum())
            self.reap[expert] += float((weights[token, slot].double() * norms).sum())

    def scores(self) -> dict:
        def mean(sums):
            return [float(s / c) if c > 0 else None for s, c in zip(sums.tolist(), self.count.tolist())]

        return {"tokens": self.tokens, "routed": [int(c) for c in self.count.tolist()],
                "frequency": [float(c / self.tokens) for c in self.count.tolist()],
                "activation": mean(self.norm), "reap": mean(self.reap)}


def calibrated_scores(source, family, calibration_path, calibration_tokens: int, settings) -> dict:
    """{"calibration", "tokens", "layers": {layer: {"tokens", "routed", "frequency", "activation", "reap"}}}
    from one layer-by-layer pass of `source` over the calibration tokens (up to its last MoE layer)."""
    from surgery.execution.calibration import CalibrationSet
    from surgery.execution.probes import Probe
    from surgery.execution.session import runner_for
    from surgery.execution.weights import ModelWeights
    from surgery.routing import router_path

    config = source.config
    dims = arch.dimensions(family, config)
    renormalise = family.top_k_norm is None or bool(arch.config_value(family, config, family.top_k_norm))
    layers = moe_layers(family, config)
    calibration = CalibrationSet.load(calibration_path, source.directory, config, calibration_tokens)
    runner = runner_for(ModelWeights.from_checkpoint(source), calibration.batches, settings)
    experts_path = family.router_input + ".experts"
    sums = {}

    def visit(layer, session, hidden):
        if layer not in layers:
            return None
        layer_sums = sums[layer] = _LayerSums(dims["experts"], dims["top_k"], renormalise)
        experts_module = session.module.get_submodule(experts_path)
        logits = {}

        def on_logits(batch, rows):
            logits[batch] = rows

        def on_inputs(batch, rows):  # after the batch's pass: the probes' hooks are gone, so calling the module is safe
            layer_sums.add(rows, logits.pop(batch), experts_module)

        return session.run(hidden, [Probe(router_path(family), "output", on_logits),
                                    Probe(experts_path, "input", on_inputs)], outputs=session.needs_output)

    runner.forward(visit, last=max(layers), final_output=False, description="scoring experts")
    return {"format": FORMAT, "source": str(source.directory), "calibration": calibration.source,
            "tokens": calibration.tokens, "experts": dims["experts"], "top_k": dims["top_k"],
            "layers": {layer: sums[layer].scores() for layer in layers}}


def save(scores: dict, path) -> None:
    Path(path).write_text(json.dumps({**scores, "layers": {str(k): v for k, v in scores["layers"].items()}}, indent=1)
                          + "\n")


def load(path, family, config: dict) -> dict:
    """A scores file written by --save-scores, checked against the source it will prune."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SurgeryError(f"--scores {path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SurgeryError(f"--scores {path}: not a scores file written by --save-scores ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("layers"), dict):
        raise SurgeryError(f"--scores {path}: not a scores file written by --save-scores (format {FORMAT} expected)")
    experts = arch.dimensions(family, config)["experts"]
    layers = moe_layers(family, config)
    found = sorted(int(k) for k in data["layers"])
    if found != layers or data.get("experts") != experts:
        raise SurgeryError(f"--scores {path}: scores for MoE layers {found} of {data.get('experts')} experts; "
                           f"the source has MoE layers {layers} of {experts} experts")
    data["layers"] = {int(k): v for k, v in data["layers"].items()}
    return data


def criterion_scores(scores: dict, criterion: str) -> tuple[dict[int, list[float]], dict[int, list[int]]]:
    """({layer: one score per expert} of `criterion`, {layer: experts no calibration token reached}). An expert no
    token reached scores 0 under activation and reap (means over its routed tokens): on this text it adds nothing,
    so it goes first. A layer that no token reached at all is refused (nothing to rank)."""
    out, unrouted = {}, {}
    for layer, entry in scores["layers"].items():
        values = entry[criterion]
        empty = [expert for expert, value in enumerate(values) if value is None]
        if empty and len(empty) == len(values):
            raise SurgeryError(f"layer {layer}: the calibration routes no token to any of its {len(values)} experts, so "
                               f"there is nothing to rank them by; use more calibration text")
        if empty:
            unrouted[layer] = empty
        out[layer] = [0.0 if value is None else value for value in values]
    return out, unrouted
