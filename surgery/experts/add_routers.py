"""`surgery add-experts`' router rows: each new expert's row fitted on its calibration text at the router input
of the written model.

The output is written as a draft with its routers deferred; the draft runs layer by layer (the layer pass) on
the texts, and at each MoE layer each text's row is fitted at the router's input (the registry's ``added-row``:
c * u, u the unit mean router input of the text, c chosen so that the new row's logit exceeds every existing
logit on about 90 % of its tokens; docs/add-experts.md). The layer then runs with its new rows, so later layers
see what the output feeds them; the rows are written into the draft before it becomes OUT.
"""

from __future__ import annotations

from pathlib import Path

import torch

from surgery.execution.layer_pass import LayerPass
from surgery.execution.routers.registry import make
from surgery.execution.routers.request import RouterRequest
from surgery.execution.routing_stats import router_path
from surgery.execution.step import RouterInputs
from surgery.execution.weights import ModelWeights
from surgery.experts.add_plan import model_card, router_names
from surgery.io.checkpoint import Checkpoint
from surgery.plan.nodes import Deferred, RouterSlot
from surgery.plan.plan import Plan
from surgery.writer.deferred import Filled


class AddedRows(RouterInputs):
    """At each MoE layer: its router's inputs on a pass stopped there; one new row per text, fitted against the
    existing rows, set (the existing rows, then the new ones) before the layer runs."""

    def __init__(self, family, calibration, existing: dict):
        super().__init__(family, existing, fits_before_run=True)
        self.calibration, self.existing = calibration, existing
        self.routers, self.wins = {}, {}

    def fit(self, layer: int, session) -> None:
        inputs, labels = self.collected().by_domain(self.calibration)
        existing = self.existing[layer]
        fitted = make("added-row", RouterRequest(len(torch.unique(labels)), int(inputs.shape[1]), inputs=inputs,
                                                 targets=labels, existing=existing))
        self.routers[layer] = torch.cat([existing, fitted.rows.to(existing.dtype)])
        self.wins[layer] = fitted.facts["wins"]
        session.set_parameter(router_path(self.family) + ".weight", self.routers[layer])


def fit_rows(weights, family, calibration, existing: dict, settings, spill_dir=None) -> tuple:
    """({MoE layer: router [experts + new, hidden] in the existing rows' dtype}, {layer: [share of its text each
    new row wins]}): `weights` (the written draft) runs layer by layer on `calibration` (one domain per new
    expert); `existing`: {layer: its existing router rows}."""
    step = AddedRows(family, calibration, existing)
    LayerPass.for_settings(weights, calibration.batches, settings, spill_dir).forward(
        [step], final_output=False, description="fitting router rows")
    return step.routers, step.wins


def fill_routers(source: Checkpoint, family, plan: Plan, calibration, settings, spill_dir, details: dict,
                 notes: list[str]):
    """The writer's ``fill`` for the plan's deferred routers: fits the new rows on the draft (``fit_rows``) and
    records each row's wins in `details`, `notes` and the model card."""
    pending = {t.name: t.recipe.slot.layer for t in plan.tensors
               if isinstance(t.recipe, Deferred) and isinstance(t.recipe.slot, RouterSlot)}

    def fill(draft, patch) -> Filled:
        existing = {layer: source.read(name) for layer, name in router_names(source, family).items()}
        with Checkpoint.open(draft) as checkpoint:
            routers, wins = fit_rows(ModelWeights.from_checkpoint(checkpoint), family, calibration, existing,
                                     settings, spill_dir)
        for position, entry in enumerate(details["added"]):
            entry["wins"] = {layer: shares[position] for layer, shares in wins.items()}
            low, high = min(entry["wins"].values()), max(entry["wins"].values())
            notes.append(f"expert {entry['index']} ({entry['name']}): FFN of {Path(entry['dense']).name}; its router "
                         f"row wins {low:.0%}-{high:.0%} of {entry['calibration']}'s {entry['tokens']} tokens over "
                         f"the existing experts, per MoE layer")
        return Filled({name: routers[layer] for name, layer in pending.items()},
                      {"README.md": model_card(source, details)})

    return fill
