"""The two ways `surgery validate` runs models over the sample: whole, or layer by layer.

Both return the same numbers (loss sums, comparisons with references, routing statistics): the
whole-model pass loads MODEL (and the references) with transformers and runs every batch through
it; the layer-by-layer pass (``surgery.execution.runner``) holds one decoder layer at a time, for
models larger than memory, and runs each model once over the sample, then their heads in
lockstep on chunks of rows so that logits are compared without holding them all.
"""

from __future__ import annotations

import contextlib
import gc
import time

import torch

from surgery import console
from surgery.checks.metrics import CompareSums, LossSums
from surgery.errors import SurgeryError
from surgery.execution.batches import Batch
from surgery.execution.layer_pass import LayerPass
from surgery.execution.loading import load_model
from surgery.execution.routing_stats import RoutingCollector, RoutingSums
from surgery.execution.weights import ModelWeights
from surgery.io.checkpoint import Checkpoint
from surgery.io.finite import nonfinite_counts


def in_memory(model_path, references, make_batches, placement, reference_placements, groups, per_pass: int) -> dict:
    """The whole-model pass; references in `groups` are loaded together (one group per pass of MODEL)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = _load(model_path, placement, "MODEL")
    load_seconds = time.perf_counter() - started
    collector = RoutingCollector(model, strict=False)  # no hooks for an architecture outside the table
    model_loss = LossSums()
    reference_losses = [LossSums() for _ in references]
    comparisons = [CompareSums() for _ in references]
    tokens_seen = batches_seen = 0
    eval_seconds = 0.0
    with console.progress("evaluating", per_pass * len(groups), unit_bytes=False) as advance:
        for pass_index, group in enumerate(groups):
            loaded = {}
            for index in group:
                began = time.perf_counter()
                loaded[index] = _load(references[index], reference_placements[index], "reference")
                load_seconds += time.perf_counter() - began
            began = time.perf_counter()
            first = pass_index == 0
            with torch.inference_mode(), (collector if first else contextlib.nullcontext()):
                for batch_index, batch in enumerate(make_batches()):
                    collector.set_mask(batch.attention_mask)
                    logits = _forward(model, batch)
                    if first:
                        model_loss.add(logits, batch)
                        tokens_seen += batch.tokens
                        batches_seen += 1
                    for index, reference in loaded.items():
                        reference_logits = _forward(reference, batch)
                        reference_losses[index].add(reference_logits, batch)
                        comparisons[index].add(logits, reference_logits, batch, batch_index)
                        del reference_logits
                    del logits
                    advance(batch.tokens, f"batch {batch_index + 1}")
            eval_seconds += time.perf_counter() - began
            _free(loaded, collect=pass_index + 1 < len(groups))

    return {"experts_implementation": getattr(model.config, "_experts_implementation", None) if collector.routers else None,
            "tokens": tokens_seen, "batches": batches_seen, "model_loss": model_loss,
            "reference_losses": reference_losses, "comparisons": comparisons,
            "routing": collector.results() if collector.routers else None,
            "load_seconds": load_seconds, "eval_seconds": eval_seconds, "passes": len(groups)}


def streamed(model_path, references, batches, settings) -> dict:
    """The layer-by-layer pass: each model once over `batches`, then every head in lockstep."""
    placement, budget = settings.placement(), settings.budget()
    started = time.perf_counter()
    runs, routing, opened = [], None, []
    try:
        for index, path in enumerate((model_path, *references)):
            checkpoint = Checkpoint.open(path, require_config=True)
            opened.append(checkpoint)
            weights = ModelWeights.from_checkpoint(checkpoint)
            layer_pass = LayerPass(weights, batches, placement, budget)
            label = "MODEL" if index == 0 else f"reference {path}"
            steps = []
            if index == 0:
                routing = RoutingSums(weights.family, weights.config)
                steps = [routing]
            hidden = layer_pass.forward(steps, description=f"{label}: layer by layer")
            runs.append((layer_pass, hidden))
        losses = [LossSums() for _ in runs]
        comparisons = [CompareSums() for _ in references]

        def consume(index, part, logits, _extras):
            batch = batches[index]
            chunk = Batch(batch.input_ids[part], batch.attention_mask[part])
            for loss, value in zip(losses, logits):
                loss.add(value, chunk)
            for comparison, value in zip(comparisons, logits[1:]):
                comparison.add(logits[0], value, chunk, index, part.start)

        LayerPass.heads(runs, consume)
    finally:
        for _, hidden in runs:
            hidden.close()
        for checkpoint in opened:
            checkpoint.close()
    seconds = time.perf_counter() - started
    tokens = sum(batch.tokens for batch in batches)
    return {"experts_implementation": None, "tokens": tokens, "batches": len(batches), "model_loss": losses[0],
            "reference_losses": losses[1:], "comparisons": comparisons,
            "routing": routing.results() if routing and routing.sums else None,
            "load_seconds": 0.0, "eval_seconds": seconds, "passes": 1}


def _load(path, placement, label: str):
    console.info(f"loading {label} {path} ({placement.device}{', device_map=auto' if placement.device_map else ''}, "
                 f"{placement.dtype_name})")
    model = load_model(path, device=placement.device, dtype=placement.dtype, device_map=placement.device_map)
    _refuse_nonfinite(model, path, placement)
    return model


def _refuse_nonfinite(model, path, placement) -> None:
    bad = [name for name, parameter in model.named_parameters() if nonfinite_counts(parameter.detach()) is not None]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise SurgeryError(f"{path}: NaN or Inf in {shown} after loading in {placement.dtype_name}")


def _input_device(model):
    return model.get_input_embeddings().weight.device


def _free(models, collect: bool) -> None:
    """Drop the models; `collect` when the memory is needed next (a full gc pass costs ~1 s)."""
    models.clear()
    if collect:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _forward(model, batch):
    device = _input_device(model)
    inputs = dict(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
    try:
        return model(**inputs).logits
    except RuntimeError as exc:  # grouped_mm refusing a stride: fall back to the loop that takes any size
        if "multiple of 16 bytes" not in str(exc) or getattr(model.config, "_experts_implementation", None) == "eager":
            raise
        model.set_experts_implementation("eager")
        return model(**inputs).logits


