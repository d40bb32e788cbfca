"""`surgery upcycle --router-init calibrated`: router rows fitted on the dense source's own router inputs.

The source runs layer by layer (``surgery.execution.layer_pass``) up to the last MoE layer; at each MoE
layer its router inputs on the calibration tokens are clustered by k-means into one centroid per copy (the
registry's ``kmeans``); each row is the unit centroid times the norm of a normal(0, router_std) row, repeated
G times. The experts are copies of the FFN, so the MoE computes what the source computes and the source's
activations are the MoE's.
"""

from __future__ import annotations

import torch

from surgery.execution.calibration import CalibrationSet
from surgery.execution.layer_pass import LayerPass
from surgery.execution.routers.registry import make
from surgery.execution.routers.request import RouterRequest
from surgery.execution.routing_stats import LayerRouting
from surgery.execution.step import RouterInputs
from surgery.execution.weights import ModelWeights
from surgery.seeds import sklearn_state


class KMeansRouters(RouterInputs):
    """At each MoE layer: the router inputs of its run, clustered into the layer's router rows."""

    def __init__(self, family, layers: list[int], options, hidden: int):
        super().__init__(family, layers)
        self.options, self.hidden = options, hidden
        self.routers, self.loads = {}, []

    def after(self, layer: int, session, rerun) -> None:
        options, inputs = self.options, self.collected().tensor()
        request = RouterRequest(options.copies, self.hidden, seed=sklearn_state(options.seed, "kmeans", layer),
                                std=options.router_std, inputs=inputs)
        rows = make("kmeans", request).rows
        self.routers[layer] = rows.repeat_interleave(options.granularity, dim=0).contiguous()
        load = LayerRouting(options.num_experts, options.top_k)
        load.add(inputs @ self.routers[layer].float().T)
        self.loads.append(load.share())


def calibrated_routers(source, family, options, layers: list[int], hidden_size: int, spill_dir=None):
    """({layer: FloatTensor[E, hidden]}, note): the calibrated router rows of every MoE layer in `layers`."""
    calibration = CalibrationSet.load(options.calibration, source.directory, source.config, options.calibration_tokens)
    layer_pass = LayerPass.for_settings(ModelWeights.from_checkpoint(source), calibration.batches, options.run,
                                        spill_dir)
    step = KMeansRouters(family, layers, options, hidden_size)
    layer_pass.forward([step], final_output=False, description="calibrating routers",
                       announce=f"calibrating routers: running {source.directory.name} on {calibration.source} "
                                f"({calibration.tokens} tokens, {layer_pass.placement.device}, "
                                f"{layer_pass.placement.dtype_name})")
    share = torch.stack(step.loads)
    note = (f"calibrated routers on {calibration.tokens} tokens: share of top-{options.top_k} slots per expert "
            f"ranges {float(share.min()):.1%}-{float(share.max()):.1%} over {len(layers)} MoE layer(s) "
            f"(uniform: {1 / options.num_experts:.1%})")
    return step.routers, note
