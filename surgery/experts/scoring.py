"""The calibrated pass that scores an MoE's experts: every MoE layer's routing and expert outputs on the
calibration tokens, up to the last MoE layer (``surgery.experts.scores`` says what the scores mean)."""

from __future__ import annotations

from surgery import families as arch
from surgery.execution.calibration import CalibrationSet
from surgery.execution.layer_pass import LayerPass
from surgery.execution.probes import Probe
from surgery.execution.routing_stats import ExpertOutputs, LayerRouting, router_path
from surgery.execution.step import Step
from surgery.execution.weights import ModelWeights
from surgery.experts.scores import FORMAT


class ExpertScores(Step):
    """At each MoE layer: its router's logits and its experts' input on every batch, and each routed expert's output
    on its tokens (``LayerRouting``'s REAP sums): recorded in the layer's own pass, where transformers' experts
    module runs its eager loop, by ``ExpertOutputs`` in place of its forward (each expert runs once, the layer's
    output bit-identical); else each expert run again on its tokens once the batch has passed."""

    def __init__(self, family, config: dict):
        dims = arch.dimensions(family, config)
        self.family, self.experts, self.top_k = family, dims["experts"], dims["top_k"]
        self.renormalise = arch.renormalises_top_k(family, config)
        self.layers = arch.moe_layers(family, config)
        self.last_layer = max(self.layers)
        self.experts_path = family.router_input + ".experts"
        # what the experts see at weight 1: the experts module's input, or the MoE block's (Llama 4's experts take
        # tokens scaled by their scores)
        self.input_path = family.router_input if family.experts_call == "scaled" else self.experts_path
        self.sums = {}

    def wants(self, layer: int) -> bool:
        return layer in self.layers

    def probes(self, layer: int, session) -> list[Probe]:
        sums = self.sums[layer] = LayerRouting(self.experts, self.top_k, self.renormalise)
        experts_module = session.submodule(self.experts_path)  # its weights are read by the pass that needs them
        recorder = ExpertOutputs(experts_module) if ExpertOutputs.applies(experts_module) else None
        if recorder is not None:
            experts_module.forward = recorder  # this layer's own copy, dropped with the session
        batches = session.runner.batches
        routed = self.routed = {}

        def on_router(batch, *rows):  # the router's logits, gate weights and chosen experts: the routing counts
            routed[batch] = sums.add(*arch.routing_of(self.family, rows, self.top_k))

        def on_inputs(batch, rows):  # after the batch's pass: the probes' hooks are gone, so calling the module is safe
            outputs = recorder.take() if recorder is not None else None
            if outputs is not None:  # every token of the batch's calls: keep the real ones, as the probes do
                real = batches[batch].attention_mask.reshape(-1).bool().to(outputs[0].device)
                outputs = (outputs[0][real], outputs[1][real])
            sums.add_outputs(*routed.pop(batch), hidden=rows, experts_module=experts_module, outputs=outputs)
            if recorder is not None:
                recorder.take()  # what a rerun of the experts there recorded: not the next batch's

        # Where the layer's experts are read together, the REAP sums come from the experts' input (optional: a pass
        # that reads the experts one at a time drops it, so that they need not be in memory together); where they
        # are read one at a time, from each expert's outputs as it is read ("expert_outputs").
        return [Probe(router_path(self.family), "outputs", on_router),
                Probe(self.input_path, "input", on_inputs, optional=True),
                Probe(self.experts_path, "expert_outputs", lambda _batch, expert, norms, gate:
                      sums.add_expert(expert, norms, gate))]

    def after(self, layer: int, session, rerun) -> None:
        self.routed = {}
        module = session.submodule(self.experts_path)
        if isinstance(module.__dict__.get("forward"), ExpertOutputs):
            del module.forward


def calibrated_scores(source, family, calibration_path, calibration_tokens: int, settings) -> dict:
    """{"calibration", "tokens", "layers": {layer: {"tokens", "routed", "frequency", "activation", "reap"}}}
    from one layer-by-layer pass of `source` over the calibration tokens (up to its last MoE layer)."""
    config = source.config
    calibration = CalibrationSet.load(calibration_path, source.directory, config, calibration_tokens)
    layer_pass = LayerPass.for_settings(ModelWeights.from_checkpoint(source), calibration.batches, settings)
    step = ExpertScores(family, config)
    layer_pass.forward([step], final_output=False, description="scoring experts")
    return {"format": FORMAT, "source": str(source.directory), "calibration": calibration.source,
            "tokens": calibration.tokens, "experts": step.experts, "top_k": step.top_k,
            "layers": {layer: step.sums[layer].scores() for layer in step.layers}}
