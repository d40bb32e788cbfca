"""Running a model on calibration text and capturing what a router would see.

The router of an MoE layer reads the output of that layer's post-attention RMSNorm; that is the
tensor captured here (not the residual stream), with padding removed. Used by the calibrated
router inits of upcycle, split and merge.
"""

from __future__ import annotations

from contextlib import contextmanager

from surgery.errors import SurgeryError


def decoder_layers(model):
    try:
        return list(model.model.layers)
    except AttributeError:
        raise SurgeryError(f"{type(model).__name__}: no model.layers to calibrate on") from None


@contextmanager
def capture_outputs(modules: dict):
    """Forward hooks that record each module's output (first element if a tuple) per call."""
    captured = {key: [] for key in modules}
    handles = []
    for key, module in modules.items():
        def hook(_module, _inputs, output, key=key):
            captured[key].append((output[0] if isinstance(output, tuple) else output).detach())
        handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def router_inputs(model, batches, layers: list[int] | None = None, max_tokens: int | None = None) -> dict:
    """{layer: FloatTensor[tokens, hidden]}: post-attention norm outputs on real (unpadded) tokens."""
    import torch

    all_layers = decoder_layers(model)
    layers = list(range(len(all_layers))) if layers is None else layers
    modules = {layer: all_layers[layer].post_attention_layernorm for layer in layers}
    collected = {layer: [] for layer in layers}
    seen = 0
    device = next(model.parameters()).device
    with torch.no_grad(), capture_outputs(modules) as captured:
        for batch in batches:
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
            keep = batch.attention_mask.reshape(-1).bool().to(device)
            for layer in layers:
                value = captured[layer].pop()
                collected[layer].append(value.reshape(-1, value.shape[-1])[keep].float().cpu())
                captured[layer].clear()
            seen += int(keep.sum())
            if max_tokens is not None and seen >= max_tokens:
                break
    if seen == 0:
        raise SurgeryError("calibration text produced no tokens")
    return {layer: torch.cat(values)[:max_tokens] for layer, values in collected.items()}
