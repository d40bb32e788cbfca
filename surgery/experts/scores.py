"""Expert scores for `surgery prune`: the criteria, seeded random scores, and the scores file of a calibrated
pass (``surgery.experts.scoring``) that a later run reuses.

Per MoE layer and routed expert, on the real calibration tokens (see docs/prune.md):

* ``frequency``: the share of tokens routed to the expert (its top-k slots over the tokens);
* ``activation``: the mean of ‖expert output‖₂ over the tokens routed to it;
* ``reap``: the mean over the same tokens of gate weight × ‖expert output‖₂ (REAP);
* ``random``: seeded uniform draws (``surgery.seeds``), no calibration.

The routing is the model's own: each token's top-k experts and gate weights come from the router's
logits (softmax, top-k, renormalised where the family's router does: ``Family.top_k_norm``). The
expert output is transformers' own experts module called on the tokens routed to one expert, all sent
to that expert with weight 1 (``execution.routing_stats.LayerRouting``). One pass computes every calibrated
criterion; ``--save-scores`` keeps them so that another criterion or ``--dry-run`` reuses the pass (``--scores``).
"""

from __future__ import annotations

import json
from pathlib import Path

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.seeds import generator

CRITERIA = ("reap", "frequency", "activation", "random")
CALIBRATED = ("reap", "frequency", "activation")
FORMAT = "surgery-prune-scores/1"


def random_scores(family, config: dict, seed: int) -> dict[int, list[float]]:
    experts = arch.dimensions(family, config)["experts"]
    return {layer: [float(v) for v in generator(seed, "prune", layer).random(experts)]
            for layer in arch.moe_layers(family, config)}


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
    layers = arch.moe_layers(family, config)
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
