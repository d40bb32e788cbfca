"""`surgery upcycle --router-init calibrated`: router rows fitted on the dense source's own router inputs."""

from __future__ import annotations

from surgery import console


def calibrated_routers(source, family, options, layers: list[int], hidden_size: int, spill_dir=None):
    """({layer: FloatTensor[E, hidden]}, note): router rows fitted on the source's own router inputs.

    The source runs layer by layer (``surgery.execution``) up to the last MoE layer; at each MoE
    layer its router inputs on the calibration tokens are clustered by k-means into one centroid
    per copy (``fit_router("kmeans")``); each row is the unit centroid times router_std * sqrt(hidden)
    (the norm of a normal(0, router_std) row), repeated G times. The experts are copies of the
    FFN, so the MoE computes what the source computes and the source's activations are the MoE's.
    """
    import torch

    from surgery.execution.calibration import CalibrationSet
    from surgery.execution.routers import expert_load, fit_router, router_norm
    from surgery.execution.session import Collect, router_input_probe, runner_for
    from surgery.execution.weights import ModelWeights
    from surgery.seeds import sklearn_state

    calibration = CalibrationSet.load(options.calibration, source.directory, source.config, options.calibration_tokens)
    runner = runner_for(ModelWeights.from_checkpoint(source), calibration.batches, options.run, spill_dir)
    console.info(f"calibrating routers: running {source.directory.name} on {calibration.source} "
                 f"({calibration.tokens} tokens, {runner.placement.device}, {runner.placement.dtype_name})")
    routers, loads = {}, []

    def visit(layer, session, hidden):
        if layer not in layers:
            return None
        collect = Collect()
        after = session.run(hidden, [router_input_probe(family, collect)], outputs=session.needs_output)
        inputs = collect.tensor()
        rows = fit_router("kmeans", inputs, rows=options.copies, seed=sklearn_state(options.seed, "kmeans", layer),
                          scale=router_norm(options.router_std, hidden_size))
        routers[layer] = rows.repeat_interleave(options.granularity, dim=0).contiguous()
        loads.append(expert_load(inputs, routers[layer], options.top_k))
        return after

    runner.forward(visit, last=max(layers), final_output=False, description="calibrating routers")
    share = torch.stack(loads)
    note = (f"calibrated routers on {calibration.tokens} tokens: share of top-{options.top_k} slots per expert "
            f"ranges {float(share.min()):.1%}-{float(share.max()):.1%} over {len(layers)} MoE layer(s) "
            f"(uniform: {1 / options.num_experts:.1%})")
    return routers, note
