"""What `surgery inspect` computes: a checkpoint's architecture, layout, parameter counts and problems.

Everything but ``tensor_stats`` comes from headers and config.json; ``tensor_stats`` streams every tensor
once (one tensor in memory at a time). A directory holding only config.json is sized from the family table
(``checks.sizing``: the parameter counts' definitions are there).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from surgery import console
from surgery import families as arch
from surgery.checks import sizing
from surgery.io.checkpoint import Checkpoint
from surgery.io.finite import nonfinite_counts

GROUP_ORDER = ("attention", "norm", "ffn", "router", "experts", "shared_expert", "embedding", "head", "mtp", "other")


@dataclass
class Report:
    path: str
    architecture: str | None
    family: str | None
    kind: str | None
    expert_layout: str | None
    summary: dict
    dtypes: dict
    shards: list
    bytes_on_disk: int
    parameters: int
    active_parameters: int | None  # parameters less the routed experts a token does not use (checks.sizing)
    moe: dict | None
    layers: list
    mtp_parameters: int | None = None  # multi-token-prediction layers stored beside the model (not in `parameters`)
    active_parameters_without_embedding: int | None = None  # active less the input embedding matrix
    config_only: bool = False  # sizes from config.json: no weights in the directory
    weight_bytes: int = 0  # the tensors' bytes (config only: in config.json's dtype)
    mtp_layers: int | None = None  # multi-token-prediction layers config.json declares
    # a multimodal checkpoint read as the text model it nests: its class, and its other towers' tensors (carried as
    # bytes by every writing command; not in `parameters`)
    nested: dict | None = None
    layer_kinds: list | None = None  # per decoder layer: ffn dense | moe, attention kind where layers differ
    # a quantized checkpoint (surgery.io.quantized): its scheme, and its quantized weights' count, parameters, bytes on
    # disk (values and scales) and formats
    quantization: dict | None = None
    notes: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    tensors: list | None = None
    stats: dict | None = None

    def to_json(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if value is not None or key not in ("tensors", "stats")}


def analyse(checkpoint: Checkpoint, with_tensors: bool = False, pattern: str | None = None,
            with_stats: bool = False) -> Report:
    config = checkpoint.config
    family = expected = dims = None
    layout = None
    problems: list[str] = []
    config_path = checkpoint.directory / "config.json"
    if config is not None:
        family = arch.detect_family(config, config_path)
        dims = arch.dimensions(family, config, config_path)
        layout = arch.detect_expert_layout(family, checkpoint.tensors) if family.kind == "moe" else None
        expected = arch.expected_tensors(family, config, layout or "per_expert", config_path)
        for name, entry in expected.items():
            info = checkpoint.tensors.get(name)
            if info is None:
                problems.append(f"missing tensor {name} (expected shape {list(entry.shape)})")
            elif tuple(info.shape) != entry.shape:
                problems.append(f"{info.file.name}: tensor {name} has shape {list(info.shape)}, config.json implies {list(entry.shape)}")
        mtp = set(arch.mtp_tensors(family, config, checkpoint.tensors))
        for name in checkpoint.tensors:
            if name not in expected and name not in mtp:
                problems.append(f"unexpected tensor {name} (not part of {family.architecture} for this config.json)")
    else:
        mtp = set()

    # parameters: what transformers' model holds; multi-token-prediction layers (not part of it) are counted apart
    total = sum(info.numel for name, info in checkpoint.tensors.items() if name not in mtp)
    per_layer: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    globals_: dict[str, list] = defaultdict(lambda: [0, 0])
    layer_re = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    for name, info in checkpoint.tensors.items():
        entry = expected.get(name) if expected else None
        group = entry.group if entry else "mtp" if name in mtp else "other"
        layer = entry.layer if entry else (int(m.group(1)) if (m := layer_re.search(name)) else None)
        bucket = per_layer[layer][group] if layer is not None else globals_[group]
        bucket[0] += 1
        bucket[1] += info.numel
    layers = [{"layer": layer, "groups": {g: {"tensors": c[0], "parameters": c[1]} for g, c in sorted(
        groups.items(), key=lambda kv: GROUP_ORDER.index(kv[0]))}} for layer, groups in sorted(per_layer.items())]
    if globals_:
        layers.append({"layer": None, "groups": {g: {"tensors": c[0], "parameters": c[1]} for g, c in globals_.items()}})

    summary, moe, sizes = {}, None, None
    if config is not None:
        summary = {
            "layers": dims["layers"], "hidden_size": dims["hidden"], "intermediate_size": dims.get("ffn"),
            "attention_heads": dims["heads"], "kv_heads": dims["kv_heads"], "head_dim": dims["head_dim"],
            "vocab_size": dims["vocab"],
            "tie_word_embeddings": bool(arch.config_value(family, config, "tie_word_embeddings")),
        }
        if family.kind == "moe":
            moe_layers = [layer for layer in range(dims["layers"]) if arch.is_moe_layer(family, config, layer)]
            experts, top_k = dims.get("experts"), dims.get("top_k")
            moe = {"experts": experts, "top_k": top_k, "expert_intermediate_size": dims.get("expert_ffn"),
                   "shared_expert_intermediate_size": dims.get("shared_ffn") or None,
                   "moe_layers": moe_layers, "dense_layers": [l for l in range(dims["layers"]) if l not in moe_layers],
                   "norm_topk_prob": config.get("norm_topk_prob")}
        sizes = sizing.count(family, config, {name: info.numel for name, info in checkpoint.tensors.items()},
                             expected, mtp)

    report = Report(
        path=str(checkpoint.path), architecture=family.architecture if family else None,
        family=family.name if family else None, kind=family.kind if family else None,
        expert_layout=None if checkpoint.config_only else layout,
        summary=summary,
        dtypes=dict(Counter(info.dtype for info in checkpoint.stored.tensors.values())),  # as stored: parts apart
        shards=[{"file": shard.name, "bytes": shard.stat().st_size,
                 "tensors": sum(1 for i in checkpoint.tensors.values() if i.file == shard)} for shard in checkpoint.shards],
        bytes_on_disk=sum(shard.stat().st_size for shard in checkpoint.shards),
        parameters=total, active_parameters=sizes.active if sizes else None, moe=moe, layers=layers,
        problems=problems, mtp_parameters=sum(checkpoint.tensors[name].numel for name in mtp) or None,
        active_parameters_without_embedding=sizes.active_without_embedding if sizes else None,
        config_only=checkpoint.config_only, weight_bytes=checkpoint.total_bytes,
        mtp_layers=sizing.mtp_layer_count(family, config) if family else None,
        layer_kinds=sizing.layer_kinds(family, config) if family else None)
    if checkpoint.nesting is not None:
        report.nested = {"architecture": checkpoint.nesting.architecture, "carried_tensors": len(checkpoint.carried),
                         "carried_parameters": sum(info.numel for info in checkpoint.carried.values()),
                         "carried_bytes": sum(info.nbytes for info in checkpoint.carried.values()),
                         "carried_prefixes": list(checkpoint.nesting.carried)}
    if checkpoint.quantization is not None:
        report.quantization = quantization_summary(checkpoint)
    if checkpoint.config_only:
        report.notes += sizing.config_notes(config)
    if config is None:
        report.warnings.append("no config.json beside the checkpoint: architecture and shapes not checked")
    selected = [info for name, info in checkpoint.tensors.items() if not pattern or re.search(pattern, name)]
    if with_tensors or pattern:
        stored = not checkpoint.config_only  # config only: no shard, no offset
        report.tensors = [{"name": i.name, "shape": list(i.shape), "dtype": i.parts[0][1].dtype if i.parts else i.dtype,
                           "shard": i.file.name if stored else None, "offset": i.offset if stored else None,
                           "bytes": i.nbytes,
                           **({"format": checkpoint.quantization.describe(i)} if i.parts else {})} for i in selected]
    if with_stats:
        report.stats = tensor_stats(checkpoint, [info.name for info in selected])
        for name, stat in report.stats.items():
            if stat.get("nan") or stat.get("inf"):
                report.warnings.append(f"{checkpoint.info(name).file}: tensor {name!r} has {stat['nan']} NaN and "
                                       f"{stat['inf']} Inf values")
    return report


def quantization_summary(checkpoint: Checkpoint) -> dict:
    """The scheme of a quantized checkpoint and what it quantizes (from headers)."""
    scheme = checkpoint.quantization
    weights = [info for info in checkpoint.tensors.values() if info.parts]
    return {"quant_method": scheme.method, "scheme": scheme.title, "quantization_config": scheme.config,
            "quantized_tensors": len(weights), "quantized_parameters": sum(info.numel for info in weights),
            "quantized_bytes": sum(info.nbytes for info in weights),
            "unquantized_bytes": sum(info.nbytes for info in checkpoint.tensors.values() if not info.parts),
            "formats": dict(Counter(scheme.describe(info) for info in weights))}


def tensor_stats(checkpoint: Checkpoint, names: list[str]) -> dict:
    """min/max/mean/std and NaN/Inf counts, one tensor in memory at a time."""
    import torch  # lazy: only --stats reads tensor values

    results = {}
    total = sum(checkpoint.tensors[n].nbytes for n in names)
    with console.progress("stats", total) as advance:
        for name in names:
            info = checkpoint.tensors[name]
            if info.dtype.startswith(("F8", "U", "I", "BOOL")) and info.dtype not in ("F32", "F16", "BF16", "F64"):
                results[name] = {"dtype": info.dtype, "skipped": "not a float16/32/64 tensor"}
            else:
                value = checkpoint.read(name).to(torch.float64 if info.dtype == "F64" else torch.float32)
                nan, inf = nonfinite_counts(value) or (0, 0)
                good = value[torch.isfinite(value)] if nan or inf else value.reshape(-1)
                results[name] = {
                    "min": good.min().item() if good.numel() else None, "max": good.max().item() if good.numel() else None,
                    "mean": good.mean().item() if good.numel() else None,
                    "std": good.std().item() if good.numel() > 1 else None,
                    "nan": nan, "inf": inf,
                }
            advance(info.nbytes, name)
    return results
