"""What `surgery validate` computes: loss on a sample, comparison with references, routing statistics.

The pass, in order:

1. structure check of MODEL and every reference from headers (tensors and shapes per config.json,
   index consistency) before anything is loaded;
2. strict load through ``surgery.loading.load_model`` (missing / unexpected / mismatched keys are
   refused), then a NaN/Inf check of the loaded parameters;
3. streaming evaluation, batch by batch: MODEL and the references run on the same batch, and only
   running sums are kept (loss, KL, top-1 agreement, max abs difference, routing counts), so memory
   is bounded by one batch whatever the length of the data. When MODEL and all references do not
   fit in memory together, references are loaded one at a time and MODEL runs once per reference.

Padding is masked out of every statistic. The tolerances of ``--expect-exact`` are explained in
docs/validate.md.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from surgery import console
from surgery import families as arch
from surgery.checks import evaluation
from surgery.checks.compare import compare_layers, difference_text
from surgery.checks.structure import require_structure
from surgery.errors import SurgeryError
from surgery.execution.batches import batches, chunk_rows, tokenize
from surgery.execution.loading import load_tokenizer
from surgery.execution.placement import Placement, _gib, available_memory, resolve_placement
from surgery.execution.settings import RunSettings
from surgery.execution.weights import ModelWeights
from surgery.io.checkpoint import Checkpoint
from surgery.io.data_files import SAMPLE_TEXT, read_text, read_token_ids

RANDOM_SEED = 0
TOGETHER_HEADROOM = 0.7  # fraction of free memory MODEL and all references may take together
VERIFY_TOKENS = 2048  # tokens of the validation sample a --verify compares layer by layer


# ------------------------------------------------------------------------------ sample batch
@dataclass
class Sample:
    rows: list  # token id lists, at most seq_len long
    source: str
    pad_token_id: int
    notes: list = field(default_factory=list)


def sample_rows(model_path, references, *, data, text, tokens, batch_size, seq_len, vocab_size,
                max_tokens=None) -> Sample:
    """The token rows to evaluate: --tokens, --data / --text through the tokenizer, the shipped sample
    text, or (no tokenizer anywhere) seeded pseudo-random ids from the vocabulary."""
    given = [name for name, value in (("--data", data), ("--text", text), ("--tokens", tokens)) if value is not None]
    if len(given) > 1:
        raise SurgeryError(f"{' and '.join(given)} are exclusive: give one sample source")
    if tokens is not None:
        rows = [piece for row in read_token_ids(tokens) for piece in chunk_rows(row, seq_len)]
        return Sample(rows, str(tokens), 0)
    tokenizer, tokenizer_path = None, None
    for path in (model_path, *references):
        tokenizer = load_tokenizer(path)
        if tokenizer is not None:
            tokenizer_path = path
            break
    notes = []
    if tokenizer is not None and tokenizer_path != model_path:
        notes.append(f"MODEL has no tokenizer; using the tokenizer of reference {tokenizer_path}")
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if data is not None or text is not None:
        if tokenizer is None:
            raise SurgeryError(f"{model_path}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json) to "
                               f"tokenize {'--data' if data is not None else '--text'}; pass ids with --tokens")
        body = read_text(data) if data is not None else text
        if not body.strip():
            raise SurgeryError("--text is empty")
        rows = _token_rows(tokenizer, body, seq_len)
        return Sample(rows, str(data) if data is not None else "--text", pad or 0, notes)
    if tokenizer is not None and SAMPLE_TEXT.is_file():
        body = read_text(SAMPLE_TEXT)
        rows = _token_rows(tokenizer, body, seq_len)
        return Sample(rows, f"shipped sample text ({SAMPLE_TEXT.name})", pad or 0, notes)
    rows = batch_size if max_tokens is None else max(1, min(batch_size, -(-max_tokens // seq_len)))
    generator = torch.Generator().manual_seed(RANDOM_SEED)
    ids = torch.randint(0, vocab_size, (rows, seq_len), generator=generator)
    reason = "no tokenizer in MODEL" if tokenizer is None else f"{SAMPLE_TEXT} is missing"
    notes.append(f"{reason} and no --tokens: evaluating {rows}×{seq_len} pseudo-random token ids "
                 f"(seed {RANDOM_SEED}) from the vocabulary; the loss means little, comparisons with "
                 f"references are still valid")
    return Sample(ids.tolist(), f"pseudo-random token ids (seed {RANDOM_SEED})", 0, notes)


def _token_rows(tokenizer, text: str, seq_len: int) -> list[list[int]]:
    """The text tokenised in one piece, cut into rows of seq_len, BOS prepended to every row when known."""
    return chunk_rows(tokenize(tokenizer, text), seq_len, getattr(tokenizer, "bos_token_id", None))


# ------------------------------------------------------------------------------ the pass
def _parameters(path) -> int:
    with Checkpoint.open(path, require_config=True) as checkpoint:
        return sum(info.numel for info in checkpoint.tensors.values())


def _structure_first(path, label: str, notes: list):
    """Header-level structure check before any load (an unsupported architecture is refused here,
    with the supported ones listed). Returns config.json's vocab_size."""
    with Checkpoint.open(path, require_config=True) as checkpoint:
        vocab = checkpoint.config.get("vocab_size")
        arch.detect_family(checkpoint.config, checkpoint.directory / "config.json")
    require_structure(path, scan=False)
    return vocab


def _token_count(rows, seq_len: int, max_tokens: int | None) -> int:
    """Real tokens ``batches`` will yield for these rows (without building the batches)."""
    total = 0
    for row in rows:
        count = min(len(row), seq_len)
        if max_tokens is not None:
            count = min(count, max_tokens - total)
        total += count
        if max_tokens is not None and total >= max_tokens:
            break
    return total


def evaluate(model_path, references=(), *, data=None, text=None, tokens=None, batch_size=8, seq_len=256,
             max_tokens=None, device="auto", dtype="auto", expect_exact=False, stream=None, memory_budget=None) -> dict:
    """The validation report as a dict (what --json prints); `exact.passed` says whether
    --expect-exact holds, without raising (``validate`` raises). `stream`: run layer by layer (None:
    when MODEL does not fit in memory)."""
    references = [str(path) for path in references]
    if batch_size < 1 or seq_len < 2 or (max_tokens is not None and max_tokens < 1):
        raise SurgeryError(f"batch size ({batch_size}) and --max-tokens must be positive, --seq-len ({seq_len}) at least 2")
    if expect_exact and len(references) != 1:
        raise SurgeryError(f"--expect-exact needs exactly one --reference, got {len(references)}")
    notes: list[str] = []
    vocab = _structure_first(model_path, "MODEL", notes)
    if type(vocab) is not int or vocab <= 0:
        raise SurgeryError(f"{Path(model_path) / 'config.json'}: vocab_size must be a positive integer, found {vocab!r}")
    for reference in references:
        reference_vocab = _structure_first(reference, "reference", notes)
        if reference_vocab != vocab:
            raise SurgeryError(f"{reference}: vocab_size {reference_vocab} differs from MODEL's {vocab} ({model_path}); "
                               f"logits cannot be compared")

    settings = RunSettings(device, memory_budget, dtype)
    parameters = [_parameters(path) for path in (model_path, *references)]
    placement = resolve_placement(device, dtype, parameters[0])
    reference_placements = [resolve_placement(device, dtype, count, label=f"reference {ref}")
                            for ref, count in zip(references, parameters[1:])]
    sample = sample_rows(model_path, references, data=data, text=text, tokens=tokens, batch_size=batch_size,
                         seq_len=seq_len, vocab_size=vocab, max_tokens=max_tokens)
    per_pass = _token_count(sample.rows, seq_len, max_tokens)
    if per_pass == 0:
        raise SurgeryError(f"the sample ({sample.source}) produced no tokens")
    element = torch.empty((), dtype=placement.dtype).element_size()
    quantized = [scheme for scheme in (_quantization(path) for path in (model_path, *references)) if scheme]
    reason = _stream_reason(stream, placement, element * parameters[0], settings, quantized)
    notes += sample.notes
    if reason:
        notes.append(f"running layer by layer ({reason}): one decoder layer in memory at a time")
    else:
        notes += placement.notes + [n for p in reference_placements for n in p.notes]
    total_bytes = element * sum(parameters)
    together = total_bytes <= TOGETHER_HEADROOM * available_memory(placement)
    if references and not together and not reason:
        groups = [[index] for index in range(len(references))]
        notes.append(f"MODEL and {len(references)} reference(s) ({_gib(total_bytes)}) do not fit in memory together: "
                     f"references are loaded one at a time and MODEL runs once per reference")
    else:
        groups = [list(range(len(references)))]
    for message in notes:
        console.note(message)

    def make_batches():
        return batches(sample.rows, batch_size, seq_len, sample.pad_token_id, max_tokens, vocab)

    if reason:
        body = evaluation.streamed(model_path, references, list(make_batches()), settings)
    else:
        body = evaluation.in_memory(model_path, references, make_batches, placement, reference_placements, groups,
                                    per_pass)
    result = {
        "model": str(model_path),
        "device": placement.device,
        "device_map": None if reason else placement.device_map,
        "dtype": placement.dtype_name,
        "layer_by_layer": bool(reason),
        "experts_implementation": body["experts_implementation"],
        "sample": {"source": sample.source, "tokens": body["tokens"], "batches": body["batches"],
                   "batch_size": batch_size, "seq_len": seq_len, "max_tokens": max_tokens},
        **body["model_loss"].result(),
        "references": [{"path": ref, **body["reference_losses"][i].result(), **body["comparisons"][i].result()}
                       for i, ref in enumerate(references)],
        "routing": body["routing"],
        "exact": None,
        "timing": {"load_seconds": body["load_seconds"], "eval_seconds": body["eval_seconds"],
                   "tokens_per_second": (body["tokens"] * body["passes"] / body["eval_seconds"]
                                         if body["eval_seconds"] else None),
                   "passes": body["passes"]},
        "peak_memory_bytes": None,
        "notes": notes,
    }
    if result["loss"] is not None and not math.isfinite(result["loss"]):
        notes.append("MODEL's loss is not finite: its logits hold NaN or Inf")
    if expect_exact:
        result["exact"] = compare_exact(model_path, references[0], list(make_batches()), settings)
    result["peak_memory_bytes"] = _peak_memory(placement)
    return _finite_json(result)


def _quantization(path) -> str | None:
    with Checkpoint.open(path, require_config=True) as checkpoint:
        return checkpoint.quantization.method if checkpoint.quantization is not None else None


def _stream_reason(stream, placement, model_bytes: int, settings, quantized=()) -> str | None:
    """Why MODEL runs layer by layer, or None when it is loaded whole."""
    if stream:
        return "--stream"
    if stream is None and quantized:  # transformers' dequantizing loaders misread some (docs/quantized.md)
        return (f"{quantized[0]} weights, dequantized as the format defines them (docs/quantized.md; --no-stream "
                f"loads them with transformers' own loader)")
    if stream is None and placement.device_map:
        return f"MODEL ({_gib(model_bytes)}) does not fit on one GPU"
    if stream is None and placement.device == "cpu" and model_bytes > TOGETHER_HEADROOM * available_memory(placement):
        return f"MODEL ({_gib(model_bytes)}) does not fit in {TOGETHER_HEADROOM:.0%} of the available memory"
    return None


def compare_exact(model_path, reference_path, batches, settings, rounding: str | None = None) -> dict:
    """The layer-by-layer exactness report of MODEL against the reference (see surgery.execution.compare);
    float32 unless a compute dtype was asked for."""
    dtype = "float32" if settings.dtype == "auto" else settings.dtype
    with Checkpoint.open(model_path, require_config=True) as model, \
            Checkpoint.open(reference_path, require_config=True) as reference:
        report = compare_layers(ModelWeights.from_checkpoint(model), ModelWeights.from_checkpoint(reference), batches,
                                replace(settings, dtype=dtype), dtype, rounding)
    report["reference"] = str(reference_path)
    report["rule"] = (f"every layer's attention, FFN/MoE and output, the embedding and the logits within "
                      f"{report['tolerance']:.1e} relative (float noise in {report['dtype']}"
                      + (f", and the {rounding} rounding of weights the operation scaled)" if rounding else ")"))
    report["message"] = None if report["passed"] else difference_text(report)
    return report


def _peak_memory(placement: Placement) -> dict:
    peak = {"cpu_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if placement.device.startswith("cuda") and torch.cuda.is_available():
        peak["gpu_allocated_bytes"] = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    return peak


def _finite_json(value):
    """NaN/Inf floats become None, so the report is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_json(item) for item in value]
    return value


def exact_error(result: dict) -> SurgeryError | None:
    exact = result.get("exact")
    if not exact or exact["passed"]:
        return None
    return SurgeryError(f"{result['model']} does not reproduce {exact['reference']}: {exact['message']}")


def validate(model_path, references=(), *, data=None, text=None, tokens=None, batch_size=8, seq_len=256,
             max_tokens=None, device="auto", dtype="auto", expect_exact=False, stream=None, memory_budget=None) -> dict:
    """Validate MODEL (see the module doc). Returns the report dict; raises SurgeryError when
    `expect_exact` is set and MODEL does not reproduce the single reference within tolerance."""
    result = evaluate(model_path, references, data=data, text=text, tokens=tokens, batch_size=batch_size,
                      seq_len=seq_len, max_tokens=max_tokens, device=device, dtype=dtype, expect_exact=expect_exact,
                      stream=stream, memory_budget=memory_budget)
    error = exact_error(result)
    if error is not None:
        raise error
    return result


def is_moe(path) -> bool:
    with Checkpoint.open(path, require_config=True) as checkpoint:
        return arch.detect_family(checkpoint.config, checkpoint.directory / "config.json").kind == "moe"


