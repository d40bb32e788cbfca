"""Exactness, layer by layer: MODEL against a reference on the same inputs (``--verify``, ``--expect-exact``).

Both models run one decoder layer at a time. Layer l of each receives the same hidden states, the
reference's output of layer l-1 (each with the masks and rotary embeddings its own config gives),
so a difference at layer l is that layer's own and never an echo of an earlier one. For every
layer the relative difference ‖Δ‖/‖reference‖ over all real tokens is measured for the attention
block's output, the FFN / MoE block's output and the layer's output; then the embedding output
and the logits of both heads on the reference's last hidden states. The first part that differs
beyond the tolerance is named, e.g. ``layer 17: MoE output differs from the dense FFN by 3.1e-02``.

Tolerance: float noise relative to the activation scale, which does not grow with depth since
every layer is compared on the same inputs: 1e-5 in float32 (measured noise <= 4e-7), 2^-6 in
bfloat16 (<= 4.4e-3), 2^-9 in float16 (<= 5.5e-4); bench/bench_validate.py --tolerances. An
operation that folds a factor that is not a power of two into bfloat16 / float16 weights rounds
them on purpose (a split into 6 experts: 1.9e-3 in bfloat16); its --verify passes that dtype as
`rounding`, and the tolerance is then at least 2^-8 / 2^-11.
"""

from __future__ import annotations

import math

import torch

from surgery.errors import SurgeryError
from surgery.execution.layer_pass import LayerPass
from surgery.execution.placement import Placement
from surgery.execution.probes import Probe

COMPUTE_TOLERANCE = {"float32": 1e-5, "bfloat16": 2.0**-6, "float16": 2.0**-9}
STORED_TOLERANCE = {"BF16": 2.0**-8, "F16": 2.0**-11}  # a rounding of the stored weights themselves


def tolerance_for(compute: str, rounding: str | None = None) -> float:
    """Float noise of the compute dtype, or the rounding of scaled low-precision weights if larger."""
    return max(COMPUTE_TOLERANCE[compute], STORED_TOLERANCE.get(rounding, 0.0))


class _Sums:
    """Σ‖Δ‖² and Σ‖reference‖² of one compared tensor over the real tokens of every batch."""

    def __init__(self):
        self.delta = 0.0
        self.norm = 0.0

    def add(self, value, reference) -> None:
        value, reference = value.float(), reference.float()
        self.delta += float(torch.sum((value - reference).square(), dtype=torch.float64))
        self.norm += float(torch.sum(reference.square(), dtype=torch.float64))

    @property
    def relative(self) -> float:
        if self.norm == 0.0:
            return 0.0 if self.delta == 0.0 else math.inf
        return math.sqrt(self.delta / self.norm)


def _module_names(family) -> dict[str, tuple[str, ...]]:
    """{'attention': (...), 'mlp': (...)}: the modules whose outputs make each sub-block of a layer (the FFN
    part is the MoE block plus any module the layer adds beside it, such as a shared expert)."""
    query = family.spec("attention", "q").template.split("{layer}.", 1)[1]
    return {"attention": (query.rsplit(".", 2)[0],), "mlp": (family.router_input, *family.extra_ffn_modules)}


def _present(module, path: str) -> bool:
    try:
        return module.get_submodule(path) is not None
    except AttributeError:  # e.g. no shared expert in this model
        return False


def compare_layers(model_weights, reference_weights, batches, settings, dtype: str = "float32",
                   rounding: str | None = None) -> dict:
    """The layer-by-layer report (see the module doc); never raises for a difference (``check`` does)."""
    _check_shapes(model_weights, reference_weights)
    placement = Placement.resolve(settings.device, dtype)
    model = LayerPass(model_weights, batches, placement, settings.budget())
    reference = LayerPass(reference_weights, batches, placement, settings.budget())
    names = {"model": _module_names(model_weights.family), "reference": _module_names(reference_weights.family)}
    hidden = reference.embed()
    model_input = model.embed()
    embedding = _Sums()
    for index, batch in enumerate(batches):
        keep = batch.attention_mask.reshape(-1).bool()
        embedding.add(_rows(model_input.get(index), keep), _rows(hidden.get(index), keep))
    model_input.close()
    layers, sums = [], {part: _Sums() for part in ("attention", "mlp", "output")}

    def probes(seen: dict, session, side: str) -> list:
        def add(part, rows):  # a part made of several modules is the sum of their outputs
            seen[part] = rows if part not in seen else seen[part] + rows
        return [Probe(path, "output", lambda batch, rows, part=part: add(part, rows))
                for part in ("attention", "mlp") for path in names[side][part] if _present(session.module, path)]

    def visit(layer, index, value, mine, theirs):
        seen = {"model": {}, "reference": {}}
        keep = batches[index].attention_mask.reshape(-1).bool().to(placement.device)
        expected = theirs.call(index, value, probes(seen["reference"], theirs, "reference"))
        got = mine.call(index, value, probes(seen["model"], mine, "model"))
        for part in ("attention", "mlp"):
            sums[part].add(seen["model"][part], seen["reference"][part])
        sums["output"].add(_rows(got, keep), _rows(expected, keep))
        return expected

    def after_layer(layer):
        layers.append({"layer": layer, **{part: sums[part].relative for part in sums}})
        sums.update({part: _Sums() for part in sums})

    hidden = model.lockstep(reference, hidden, visit, after_layer)
    head = _Sums()

    def compare(index, part, logits, _extras):
        keep = batches[index].attention_mask[part].reshape(-1).bool()
        head.add(_rows(logits[0].detach().float(), keep), _rows(logits[1].detach().float(), keep))

    LayerPass.heads([(model, hidden), (reference, hidden)], compare)  # both heads on the reference's last hidden states
    hidden.close()
    tolerance = tolerance_for(placement.dtype_name, rounding)
    report = {"dtype": placement.dtype_name, "tolerance": tolerance, "embedding": embedding.relative,
              "layers": layers, "head": head.relative, "kinds": {"model": model_weights.family.kind,
                                                                 "reference": reference_weights.family.kind}}
    report["first_difference"] = first_difference(report)
    report["passed"] = report["first_difference"] is None
    report["max_relative"] = max([report["embedding"], report["head"]]
                                 + [value for row in layers for key, value in row.items() if key != "layer"])
    return report


def first_difference(report: dict) -> dict | None:
    """The first part (in model order) whose relative difference exceeds the tolerance (NaN does too)."""
    tolerance = report["tolerance"]

    def bad(value):
        return not value <= tolerance

    if bad(report["embedding"]):
        return {"where": "embedding", "relative": report["embedding"]}
    for row in report["layers"]:
        for part in ("attention", "mlp", "output"):
            if bad(row[part]):
                return {"where": f"layer {row['layer']}", "part": part, "relative": row[part]}
    if bad(report["head"]):
        return {"where": "head", "relative": report["head"]}
    return None


def difference_text(report: dict) -> str:
    """One line naming the first difference: `layer 17: MoE output differs from the dense FFN by 3.1e-02 ...`."""
    found = report["first_difference"]
    tolerance = f"(relative; tolerance {report['tolerance']:.1e} in {report['dtype']})"
    value = "NaN" if found["relative"] != found["relative"] else f"{found['relative']:.1e}"
    if found["where"] == "embedding":
        return f"embedding output differs from the reference's by {value} {tolerance}"
    if found["where"] == "head":
        return f"logits (final norm and head) differ from the reference's by {value} {tolerance}"
    kinds = report["kinds"]
    what = {"attention": "attention output differs from the reference's",
            "output": "layer output differs from the reference's",
            "mlp": ("MoE output differs from the dense FFN" if kinds["model"] == "moe" and kinds["reference"] == "dense"
                    else "FFN output differs from the reference's")}[found["part"]]
    return f"{found['where']}: {what} by {value} {tolerance}"


def _rows(value, keep):
    return value.reshape(-1, value.shape[-1])[keep.to(value.device)]


def _check_shapes(model, reference) -> None:
    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if model.config.get(key) != reference.config.get(key):
            raise SurgeryError(f"{model.label}: {key} {model.config.get(key)} differs from the reference's "
                               f"{reference.config.get(key)} ({reference.label}); the models cannot be compared layer by layer")
