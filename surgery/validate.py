"""`surgery validate`: loss on a sample batch, comparison with references, routing statistics.

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

import contextlib
import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from surgery import console
from surgery.errors import SurgeryError

# --expect-exact tolerances on the logits max abs difference (see docs/validate.md).
# float32: absolute. bfloat16 / float16: relative to the largest |reference logit| on the batch,
# 8 machine epsilons of the dtype (eps = 2^-7 and 2^-10).
EXACT_TOLERANCE = {"float32": ("absolute", 1e-4), "bfloat16": ("relative", 2.0**-4), "float16": ("relative", 2.0**-7)}
RANDOM_SEED = 0
GPU_HEADROOM = 0.85  # fraction of free GPU memory the weights may take (the rest: activations)
TOGETHER_HEADROOM = 0.7  # fraction of free memory MODEL and all references may take together
COMPARE_BLOCK = 2**24  # logits elements compared at once (bounded temporaries for large vocabularies)


def exact_tolerance(dtype: str, reference_scale: float) -> float:
    kind, value = EXACT_TOLERANCE[dtype]
    return value if kind == "absolute" else value * reference_scale


def tolerance_rule(dtype: str) -> str:
    kind, value = EXACT_TOLERANCE[dtype]
    return f"{value:g} absolute" if kind == "absolute" else f"{value:g} × max |reference logit|"


# ------------------------------------------------------------------------------ placement
@dataclass
class Placement:
    device: str  # where inputs go; "cuda", "cuda:1" or "cpu"
    dtype: object  # torch.dtype
    device_map: str | None = None  # "auto" when the model is spread by accelerate
    notes: list = field(default_factory=list)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def free_gpu_memory() -> list[int]:
    """Free bytes of every visible CUDA device ([] without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count())]


def resolve_placement(device: str = "auto", dtype: str = "auto", parameters: int = 0, gpus: list[int] | None = None,
                      label: str = "MODEL") -> Placement:
    """Device, dtype and device map for a model of `parameters` parameters.

    `gpus` is the free memory of each visible GPU (queried when None). auto picks CUDA when there is
    one (bfloat16 by default there) and the CPU otherwise (float32). A model whose weights exceed
    GPU_HEADROOM of one GPU's free memory is spread over all visible GPUs with accelerate's
    ``device_map="auto"`` (which offloads to CPU what still does not fit).
    """
    import torch

    from surgery.loading import resolve_dtype

    gpus = free_gpu_memory() if gpus is None else list(gpus)
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device.startswith("cuda"):
        if not gpus:
            raise SurgeryError(f"--device {device}: no CUDA device is available (torch {torch.__version__})")
        index_text = device.partition(":")[2] or "0"
        if not index_text.isdigit() or int(index_text) >= len(gpus):
            raise SurgeryError(f"--device {device}: expected cuda or cuda:N with N < {len(gpus)} visible GPU(s)")
        index = int(index_text)
    elif device != "cpu":
        raise SurgeryError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    torch_dtype = resolve_dtype(dtype, device)
    placement = Placement(device, torch_dtype)
    if device.startswith("cuda"):
        weight_bytes = parameters * torch.empty((), dtype=torch_dtype).element_size()
        if weight_bytes > GPU_HEADROOM * gpus[index]:
            where = f"{len(gpus)} GPU(s) ({_gib(sum(gpus))} free in all)"
            if sum(gpus) * GPU_HEADROOM < weight_bytes:
                where += ", the rest offloaded to CPU"
            placement.device_map = "auto"
            placement.notes.append(f"{label} ({_gib(weight_bytes)} in {placement.dtype_name}) does not fit on "
                                   f"{device} ({_gib(gpus[index])} free): spread over {where} with accelerate "
                                   f"device_map='auto'")
    return placement


def _gib(count: float) -> str:
    return f"{count / 2**30:.1f} GiB"


def available_memory(placement: Placement) -> int:
    """Free bytes where the weights go: GPU memory (all GPUs with a device map) or CPU MemAvailable."""
    if placement.device.startswith("cuda"):
        gpus = free_gpu_memory()
        if placement.device_map:
            return sum(gpus)
        return gpus[int(placement.device.partition(":")[2] or 0)]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


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
    from surgery import samples
    from surgery.loading import load_tokenizer

    given = [name for name, value in (("--data", data), ("--text", text), ("--tokens", tokens)) if value is not None]
    if len(given) > 1:
        raise SurgeryError(f"{' and '.join(given)} are exclusive: give one sample source")
    if tokens is not None:
        rows = [piece for row in samples.read_token_ids(tokens) for piece in samples.chunk_rows(row, seq_len)]
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
        body = samples.read_text(data) if data is not None else text
        if not body.strip():
            raise SurgeryError("--text is empty")
        rows = _token_rows(tokenizer, body, seq_len)
        return Sample(rows, str(data) if data is not None else "--text", pad or 0, notes)
    if tokenizer is not None and samples.SAMPLE_TEXT.is_file():
        body = samples.read_text(samples.SAMPLE_TEXT)
        rows = _token_rows(tokenizer, body, seq_len)
        return Sample(rows, f"shipped sample text ({samples.SAMPLE_TEXT.name})", pad or 0, notes)
    import torch

    rows = batch_size if max_tokens is None else max(1, min(batch_size, -(-max_tokens // seq_len)))
    generator = torch.Generator().manual_seed(RANDOM_SEED)
    ids = torch.randint(0, vocab_size, (rows, seq_len), generator=generator)
    reason = "no tokenizer in MODEL" if tokenizer is None else f"{samples.SAMPLE_TEXT} is missing"
    notes.append(f"{reason} and no --tokens: evaluating {rows}×{seq_len} pseudo-random token ids "
                 f"(seed {RANDOM_SEED}) from the vocabulary; the loss means little, comparisons with "
                 f"references are still valid")
    return Sample(ids.tolist(), f"pseudo-random token ids (seed {RANDOM_SEED})", 0, notes)


def _token_rows(tokenizer, text: str, seq_len: int) -> list[list[int]]:
    """The text tokenised in one piece (the tokenizer's "longer than the maximum length" warning is
    silenced: the ids are cut into rows of seq_len), BOS prepended to every row when known."""
    import transformers

    from surgery import samples

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        ids = samples.tokenize(tokenizer, text)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return samples.chunk_rows(ids, seq_len, getattr(tokenizer, "bos_token_id", None))


# ------------------------------------------------------------------------------ running sums
class LossSums:
    """Next-token cross-entropy over positions whose token and next token are both real."""

    def __init__(self):
        self.total = 0.0
        self.predicted = 0

    def add(self, logits, batch) -> None:
        import torch

        mask = batch.attention_mask.to(logits.device).bool()
        valid = mask & mask.roll(-1, dims=1)
        valid[:, -1] = False
        labels = batch.input_ids.to(logits.device).roll(-1, dims=1).masked_fill(~valid, -100)
        if valid.any():  # the logits are used in place (a view), not copied per valid position
            self.total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100,
                reduction="sum").double())
            self.predicted += int(valid.sum())

    def result(self) -> dict:
        if not self.predicted:
            return {"loss": None, "perplexity": None, "predicted_tokens": 0}
        loss = self.total / self.predicted
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "predicted_tokens": self.predicted}


class CompareSums:
    """MODEL against one reference on real positions: max abs logit difference (and where),
    mean KL(reference ‖ model), top-1 agreement, largest |reference logit|."""

    def __init__(self):
        self.positions = 0
        self.max_abs = 0.0
        self.where = None
        self.kl = 0.0
        self.agree = 0
        self.scale = 0.0

    def add(self, model_logits, reference_logits, batch, batch_index: int) -> None:
        import torch

        if model_logits.shape != reference_logits.shape:
            raise SurgeryError(f"logits shapes differ: MODEL {list(model_logits.shape)}, reference {list(reference_logits.shape)}")
        real = batch.attention_mask.to(model_logits.device).bool()
        coordinates = real.nonzero()
        reference_logits = reference_logits.to(model_logits.device)
        if bool(real.all()):  # views, no copies
            model_real = model_logits.reshape(-1, model_logits.shape[-1])
            reference_real = reference_logits.reshape(-1, reference_logits.shape[-1])
        else:
            model_real, reference_real = model_logits[real], reference_logits[real]
        step = max(1, COMPARE_BLOCK // model_real.shape[-1])
        for start in range(0, model_real.shape[0], step):
            m = model_real[start:start + step].float()
            r = reference_real[start:start + step].float()
            diff = (m - r).abs()
            flat = int(diff.argmax())
            value = float(diff.reshape(-1)[flat])
            if value > self.max_abs or self.where is None or math.isnan(value):
                position = start + flat // m.shape[-1]
                row, column = (int(v) for v in coordinates[position])
                self.max_abs = value
                self.where = {"batch": batch_index, "row": row, "position": column, "token_id": flat % m.shape[-1]}
            log_m = torch.log_softmax(m, dim=-1)
            log_r = torch.log_softmax(r, dim=-1)
            self.kl += float((log_r.exp() * (log_r - log_m)).sum().double())
            self.agree += int((m.argmax(-1) == r.argmax(-1)).sum())
            self.scale = max(self.scale, float(r.abs().max()))
        self.positions += model_real.shape[0]

    def result(self) -> dict:
        return {"max_abs_diff": self.max_abs, "max_abs_diff_at": self.where,
                "mean_kl": self.kl / self.positions if self.positions else None,
                "top1_agreement": self.agree / self.positions if self.positions else None,
                "reference_logit_scale": self.scale, "positions": self.positions}


# ------------------------------------------------------------------------------ the pass
def _parameters(path) -> int:
    from surgery.checkpoint import Checkpoint

    with Checkpoint.open(path, require_config=True) as checkpoint:
        return sum(info.numel for info in checkpoint.tensors.values())


def _structure_first(path, label: str, notes: list):
    """Header-level structure check before any load (an unsupported architecture is refused here,
    with the supported ones listed). Returns config.json's vocab_size."""
    from surgery import architectures as arch
    from surgery.checkpoint import Checkpoint
    from surgery.structure import require_structure

    with Checkpoint.open(path, require_config=True) as checkpoint:
        vocab = checkpoint.config.get("vocab_size")
        arch.detect_family(checkpoint.config, checkpoint.directory / "config.json")
    require_structure(path, scan=False)
    return vocab


def _load(path, placement: Placement, label: str):
    from surgery.loading import load_model

    console.info(f"loading {label} {path} ({placement.device}{', device_map=auto' if placement.device_map else ''}, "
                 f"{placement.dtype_name})")
    model = load_model(path, device=placement.device, dtype=placement.dtype, device_map=placement.device_map)
    _refuse_nonfinite(model, path, placement)
    _faster_experts(model, placement)
    return model


def _faster_experts(model, placement: Placement) -> None:
    """On CPU load_model picks the eager experts loop, which works for any expert size. transformers'
    grouped_mm is ~1.6x faster on CPU and exact in float32, but needs every matrix stride to be a
    multiple of 16 bytes; switch to it where the expert sizes allow."""
    from surgery import architectures as arch

    if placement.device != "cpu" or getattr(model.config, "_experts_implementation", None) != "eager":
        return
    config = model.config.to_dict()
    try:
        family = arch.detect_family(config)
        dims = arch.dimensions(family, config)
    except SurgeryError:
        return
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}.get(placement.dtype_name)
    sizes = (dims.get("expert_ffn"), dims["hidden"])
    if family.kind != "moe" or itemsize is None or None in sizes or any(size * itemsize % 16 for size in sizes):
        return
    try:
        model.set_experts_implementation("grouped_mm")
    except (AttributeError, ValueError, ImportError):
        return


def _refuse_nonfinite(model, path, placement: Placement) -> None:
    import torch

    # A float32 sum is non-finite iff the tensor holds NaN/Inf (weights never sum past 3e38); it costs one
    # read and no mask, ~10x less than isfinite(). A non-finite sum is confirmed element-wise.
    bad = [name for name, parameter in model.named_parameters()
           if parameter.is_floating_point() and not bool(torch.isfinite(parameter.sum(dtype=torch.float32)))
           and not bool(torch.isfinite(parameter).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise SurgeryError(f"{path}: NaN or Inf in {shown} after loading in {placement.dtype_name}")


def _token_count(rows, seq_len: int, max_tokens: int | None) -> int:
    """Real tokens samples.batches will yield for these rows (without building the batches)."""
    total = 0
    for row in rows:
        count = min(len(row), seq_len)
        if max_tokens is not None:
            count = min(count, max_tokens - total)
        total += count
        if max_tokens is not None and total >= max_tokens:
            break
    return total


def _input_device(model):
    return model.get_input_embeddings().weight.device


def _free(models, collect: bool) -> None:
    """Drop the models; `collect` when the memory is needed next (a full gc pass costs ~1 s)."""
    import torch

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


def evaluate(model_path, references=(), *, data=None, text=None, tokens=None, batch_size=8, seq_len=256,
             max_tokens=None, device="auto", dtype="auto", expect_exact=False) -> dict:
    """The validation report as a dict (what --json prints); `exact.passed` says whether
    --expect-exact holds, without raising (``validate`` raises)."""
    import torch

    from surgery import samples
    from surgery.routing import RoutingCollector

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

    parameters = [_parameters(path) for path in (model_path, *references)]
    placement = resolve_placement(device, dtype, parameters[0])
    reference_placements = [resolve_placement(device, dtype, count, label=f"reference {ref}")
                            for ref, count in zip(references, parameters[1:])]
    sample = sample_rows(model_path, references, data=data, text=text, tokens=tokens, batch_size=batch_size,
                         seq_len=seq_len, vocab_size=vocab, max_tokens=max_tokens)
    notes += placement.notes + sample.notes + [n for p in reference_placements for n in p.notes]

    element = torch.empty((), dtype=placement.dtype).element_size()
    total_bytes = element * sum(parameters)
    together = total_bytes <= TOGETHER_HEADROOM * available_memory(placement)
    if references and not together:
        groups = [[index] for index in range(len(references))]
        notes.append(f"MODEL and {len(references)} reference(s) ({_gib(total_bytes)}) do not fit in memory together: "
                     f"references are loaded one at a time and MODEL runs once per reference")
    else:
        groups = [list(range(len(references)))]
    for message in notes:
        console.note(message)

    def make_batches():
        return samples.batches(sample.rows, batch_size, seq_len, sample.pad_token_id, max_tokens, vocab)

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
    per_pass = _token_count(sample.rows, seq_len, max_tokens)
    if per_pass == 0:
        raise SurgeryError(f"the sample ({sample.source}) produced no tokens")
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

    result = {
        "model": str(model_path),
        "device": placement.device,
        "device_map": placement.device_map,
        "dtype": placement.dtype_name,
        "experts_implementation": getattr(model.config, "_experts_implementation", None) if collector.routers else None,
        "sample": {"source": sample.source, "tokens": tokens_seen, "batches": batches_seen,
                   "batch_size": batch_size, "seq_len": seq_len, "max_tokens": max_tokens},
        **model_loss.result(),
        "references": [{"path": ref, **reference_losses[i].result(), **comparisons[i].result()}
                       for i, ref in enumerate(references)],
        "routing": collector.results() if collector.routers else None,
        "exact": None,
        "timing": {"load_seconds": load_seconds, "eval_seconds": eval_seconds,
                   "tokens_per_second": tokens_seen * len(groups) / eval_seconds if eval_seconds else None,
                   "passes": len(groups)},
        "peak_memory_bytes": _peak_memory(placement),
        "notes": notes,
    }
    if result["loss"] is not None and not math.isfinite(result["loss"]):
        notes.append("MODEL's loss is not finite: its logits hold NaN or Inf")
    if expect_exact:
        comparison = result["references"][0]
        tolerance = exact_tolerance(placement.dtype_name, comparison["reference_logit_scale"])
        difference = comparison["max_abs_diff"]
        result["exact"] = {"dtype": placement.dtype_name, "tolerance": tolerance,
                           "rule": tolerance_rule(placement.dtype_name), "max_abs_diff": difference,
                           "passed": bool(difference <= tolerance)}  # NaN fails
    return _finite_json(result)


def _peak_memory(placement: Placement) -> dict:
    import resource

    import torch

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
    reference = result["references"][0]
    where = reference.get("max_abs_diff_at") or {}
    difference = exact["max_abs_diff"]
    shown = "NaN" if difference is None else f"{difference:.6g}"
    location = (f" (batch {where['batch']}, row {where['row']}, position {where['position']}, token id {where['token_id']})"
                if where else "")
    return SurgeryError(f"{result['model']} does not reproduce {reference['path']}: logits max abs difference {shown}"
                        f"{location} exceeds the {exact['dtype']} tolerance {exact['tolerance']:.6g} ({exact['rule']})")


def validate(model_path, references=(), *, data=None, text=None, tokens=None, batch_size=8, seq_len=256,
             max_tokens=None, device="auto", dtype="auto", expect_exact=False) -> dict:
    """Validate MODEL (see the module doc). Returns the report dict; raises SurgeryError when
    `expect_exact` is set and MODEL does not reproduce the single reference within tolerance."""
    result = evaluate(model_path, references, data=data, text=text, tokens=tokens, batch_size=batch_size,
                      seq_len=seq_len, max_tokens=max_tokens, device=device, dtype=dtype, expect_exact=expect_exact)
    error = exact_error(result)
    if error is not None:
        raise error
    return result


def verify_exact(out_path, reference_path, device="auto") -> dict:
    """What `upcycle --verify` / `split --verify` run: OUT must reproduce the reference's logits."""
    return validate(out_path, [reference_path], device=device, expect_exact=True)


# ------------------------------------------------------------------------------ output
def _number(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}"


def print_result(result: dict) -> None:
    from rich.table import Table

    from surgery.routing import load_bars

    out = console.stdout
    sample = result["sample"]
    placement = result["device"] + (" (device_map=auto)" if result["device_map"] else "")
    out.print(f"[bold]{result['model']}[/] on {placement}, {result['dtype']}: {sample['tokens']} tokens in "
              f"{sample['batches']} batch(es) of {sample['source']}")
    table = Table(header_style="bold")
    table.add_column("model", overflow="fold")
    for column in ("loss", "perplexity", "max |Δ logit|", "KL(ref‖model)", "top-1 agree"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_row("MODEL", _number(result["loss"]), _number(result["perplexity"]), "", "", "")
    for reference in result["references"]:
        agreement = reference["top1_agreement"]
        table.add_row(reference["path"], _number(reference["loss"]), _number(reference["perplexity"]),
                      _number(reference["max_abs_diff"]), _number(reference["mean_kl"]),
                      "—" if agreement is None else f"{agreement:.2%}")
    out.print(table)
    if result["routing"]:
        first = result["routing"][0]
        routing = Table(title=f"routing: load per expert (full bar = 2/N, · = unused), entropies in nats "
                              f"(max ln N = {first['max_entropy']:.3f}), LB = α·N·Σ u·p with α = "
                              f"{first['load_balancing_alpha']:g}", header_style="bold")
        for column in ("layer", "load", "share", "unused", "H(load)", "H(router)", "LB", "z-loss"):
            routing.add_column(column, justify="left" if column == "load" else "right")
        for layer in result["routing"]:
            share = layer["share"]
            routing.add_row(str(layer["layer"]), load_bars(share), f"{min(share):.2f}–{max(share):.2f}",
                            ", ".join(map(str, layer["unused_experts"])) or "0",
                            f"{layer['load_entropy']:.3f}", f"{layer['router_entropy']:.3f}",
                            f"{layer['load_balancing_loss']:.4g}", f"{layer['router_z_loss']:.4g}")
        out.print(routing)
    timing = result["timing"]
    if timing["tokens_per_second"]:
        out.print(f"[dim]load {timing['load_seconds']:.1f} s, evaluation {timing['eval_seconds']:.1f} s "
                  f"({timing['tokens_per_second']:.0f} tokens/s)[/]")
    exact = result["exact"]
    if exact:
        verdict = "[green]passed[/]" if exact["passed"] else "[red]FAILED[/]"
        out.print(f"expect-exact: {verdict}: max abs diff {_number(exact['max_abs_diff'], 6)} vs {exact['dtype']} "
                  f"tolerance {exact['tolerance']:.6g} ({exact['rule']})")


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise SurgeryError("--plot needs matplotlib, which is not installed: pip install 'surgery[plot]' "
                           "(or pip install matplotlib)") from None
    return matplotlib


def plot_load(result: dict, path) -> None:
    """Heat map of expert load (share of top-k assignments), layers × experts."""
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routing = result["routing"]
    shares = [layer["share"] for layer in routing]
    figure, axes = plt.subplots(figsize=(max(5, 0.4 * len(shares[0]) + 2), max(3, 0.3 * len(shares) + 1.5)))
    image = axes.imshow(shares, aspect="auto", cmap="viridis", vmin=0)
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_yticks(range(len(routing)), [str(layer["layer"]) for layer in routing])
    axes.set_title(f"share of top-k assignments (balanced: {1 / len(shares[0]):.3g})", fontsize=10)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise SurgeryError(f"--plot {path}: cannot write: {exc.strerror}") from None
    finally:
        plt.close(figure)


def _is_moe(path) -> bool:
    from surgery import architectures as arch
    from surgery.checkpoint import Checkpoint

    with Checkpoint.open(path, require_config=True) as checkpoint:
        return arch.detect_family(checkpoint.config, checkpoint.directory / "config.json").kind == "moe"


@click.command("validate")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--reference", "-r", "references", multiple=True, type=click.Path(path_type=str),
              help="A checkpoint to compare MODEL with (repeatable).")
@click.option("--data", type=click.Path(path_type=str), help="UTF-8 text file, tokenised with MODEL's tokenizer.")
@click.option("--text", help="Text to evaluate on, tokenised with MODEL's tokenizer.")
@click.option("--tokens", type=click.Path(path_type=str), help="Pre-tokenised ids: .npy, .pt or .jsonl.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(2), help="Tokens per row.")
@click.option("--max-tokens", type=click.IntRange(1), help="Stop after this many real tokens.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="auto: bfloat16 on CUDA, float32 on CPU.")
@click.option("--expect-exact", is_flag=True,
              help="Exit non-zero unless MODEL reproduces the single reference's logits within the dtype's tolerance.")
@click.option("--structure-only", is_flag=True,
              help="Only check tensors, shapes, index and NaN/Inf from the files; load no model.")
@click.option("--plot", type=click.Path(path_type=str), help="Write the layer × expert load heat map (PNG; needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(model, references, data, text, tokens, batch_size, seq_len, max_tokens, device, dtype, expect_exact,
            structure_only, plot, as_json):
    """Load MODEL, measure its loss, compare it with references, and show MoE routing statistics."""
    if structure_only:
        from surgery.structure import check_structure, print_structure, problems_error

        report = check_structure(model, scan=True)
        if as_json:
            console.stdout.print_json(json.dumps(report))
        else:
            print_structure(report)
        if report["problems"]:
            raise problems_error(model, report)
        return
    if plot:
        if not _is_moe(model):
            raise SurgeryError(f"--plot: {model} is a dense model; there is no routing to plot")
        require_matplotlib()
    result = evaluate(model, references, data=data, text=text, tokens=tokens, batch_size=batch_size, seq_len=seq_len,
                      max_tokens=max_tokens, device=device, dtype=dtype, expect_exact=expect_exact)
    if as_json:
        console.stdout.print_json(json.dumps(result))
    else:
        print_result(result)
    if plot:
        plot_load(result, plot)
        console.info(f"wrote {plot}")
    error = exact_error(result)
    if error is not None:
        raise error
