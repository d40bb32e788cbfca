"""Sizes from config.json alone, and the parameter counts `surgery inspect` and every ``--dry-run`` print.

A directory that holds only ``config.json`` opens (inside ``config_only``) as a checkpoint whose tensor headers
come from the family table: every tensor ``expected_tensors`` lists for the config, in the layout hub checkpoints
store (per expert, or fused where the family stores nothing else), in config.json's dtype (``dtype`` /
``torch_dtype``; float32 where it names none). Multi-token-prediction layers are not in the table: they are
counted (``mtp_layers``), not sized.

Parameter counts, one definition each (docs: README "Sizes before you download"):

* ``parameters``: every weight transformers' model holds (parameters and saved buffers, tied weights once);
  multi-token-prediction layers stored beside the model are counted apart;
* ``active``: what one token's forward pass reads: ``parameters`` less the routed experts it does not use,
  routed experts' weights x (1 - top_k / experts); the input embedding and the head count in full;
* ``active_without_embedding``: ``active`` less the input embedding matrix (a token reads one row of it), the
  convention of DeepSeek's and gpt-oss' published figures. With tied embeddings that matrix is also the output
  head: it is left out all the same (the "non-embedding" count).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.io import checkpoint as checkpoint_io
from surgery.io.dtypes import DTYPE_SIZES
from surgery.io.safetensors_format import TensorInfo

CONFIG_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


def config_dtype(config: dict) -> str | None:
    """The safetensors dtype config.json names (``dtype``, or transformers 4's ``torch_dtype``); None: none."""
    value = config.get("dtype") or config.get("torch_dtype")
    return CONFIG_DTYPES.get(str(value).removeprefix("torch.")) if isinstance(value, str) else None


def stored_layout(family) -> str:
    """The expert layout a hub checkpoint of `family` stores: per expert, unless the family stores them fused only."""
    return "per_expert" if "per_expert" in family.stored_layouts else "fused"


def headers_from_config(directory: Path, config: dict) -> dict[str, TensorInfo]:
    """The tensor headers config.json implies, by stored name: every tensor of the family table, in config.json's
    dtype; a multimodal config's other towers (``families.nesting``) sized by transformers' own class."""
    where = Path(directory) / "config.json"
    nesting, text = arch.text_view(config, where)
    family = arch.detect_family(text, where)
    dtype = config_dtype(text) or config_dtype(config) or "F32"

    def info(name, shape):
        return TensorInfo(name, dtype, tuple(shape), where, 0, math.prod(shape) * DTYPE_SIZES[dtype])

    expected = arch.expected_tensors(family, text, stored_layout(family), where)
    headers = {stored: info(stored, entry.shape) for stored, entry in
               ((nesting.stored_name(name) if nesting else name, entry) for name, entry in expected.items())}
    if nesting is not None and nesting.carried:
        from surgery.execution.loading import tower_shapes  # lazy: builds transformers' class on the meta device

        headers.update({name: info(name, shape) for name, shape in tower_shapes(config, nesting.carried).items()})
    return headers


def config_only(enabled: bool = True, needs: str = "this command"):
    """A context in which a directory holding only config.json opens with the headers it implies (`enabled`), or
    is refused saying that `needs` needs the weights."""
    return checkpoint_io.config_only(headers_from_config if enabled else None, needs)


def config_notes(config: dict) -> list[str]:
    """What a config-only size assumes: the dtype bytes are counted in, and quantised published weights."""
    dtype = config_dtype(config)
    named = config.get("dtype") or config.get("torch_dtype")
    notes = [] if dtype is not None else [f"config.json's dtype {named!r} is not a float type safetensors stores: bytes "
                                          "are float32's" if named else "config.json names no dtype: bytes are float32's"]
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict):
        method = quantization.get("quant_method") or "quantised"
        notes.append(f"config.json has a quantization_config ({method}): the published weights are stored quantised, "
                     f"so their files differ from these {dtype or 'F32'} bytes")
    return notes


@dataclass(frozen=True)
class Sizes:
    parameters: int
    active: int
    active_without_embedding: int
    routed: int  # the routed experts' weights


def count(family, config: dict, numels: Mapping[str, int], expected: Mapping, mtp=()) -> Sizes:
    """The parameter counts (module docstring) of tensors `numels` (name -> elements) of a `family` model with
    `config`; `expected`: ``expected_tensors`` of it, `mtp`: the names of its multi-token-prediction tensors."""
    mtp = set(mtp)
    dims = arch.dimensions(family, config)

    def group(name: str) -> str | None:
        entry = expected.get(name)
        return entry.group if entry is not None else None

    total = sum(n for name, n in numels.items() if name not in mtp)
    routed = sum(n for name, n in numels.items() if group(name) == "experts")
    experts, top_k = dims.get("experts"), dims.get("top_k")
    unused = round(routed * (1 - top_k / experts)) if family.kind == "moe" and experts and top_k else 0
    active = total - unused
    embedding = sum(n for name, n in numels.items() if group(name) == "embedding")
    return Sizes(total, active, active - embedding, routed)


def mtp_layer_count(family, config: dict) -> int:
    """Multi-token-prediction layers the config declares (the count keys of ``Family.mtp_off``)."""
    if family.mtp_prefixes is None:
        return 0
    counts = [arch.config_value(family, config, key) for key, off in family.mtp_off.items() if off == 0]
    return sum(value for value in counts if type(value) is int and value > 0)


def unsized_mtp(config: dict) -> str:
    """', without its N multi-token-prediction layers (...)' where a config-only plan leaves out layers config.json
    declares; '' otherwise."""
    layers = mtp_layer_count(arch.detect_family(config), config)
    return (f", without the {layers} multi-token-prediction layer{'s' if layers > 1 else ''} it declares (not in the "
            "family table; a checkpoint that stores them may plan them differently)") if layers else ""


def attention_kinds(family, config: dict, layers: int) -> list[str] | None:
    """Each layer's attention kind where the family or config has layer types (the family's ``layer_type``, its
    sliding layers, or config.json's ``layer_types``); None where every layer attends fully."""
    if family.layer_type is not None:
        kinds = [str(family.layer_type(config, layer)) for layer in range(layers)]
    else:
        windows = arch.layer_windows(family, config) if family.sliding is not None else {}
        types = config.get("layer_types")
        if windows:
            kinds = ["sliding_attention" if layer in windows else "full_attention" for layer in range(layers)]
        elif isinstance(types, list) and len(types) == layers and all(isinstance(kind, str) for kind in types):
            kinds = list(types)
        else:
            return None
    return kinds if any(kind != "full_attention" for kind in kinds) else None


def layer_kinds(family, config: dict) -> list[dict]:
    """[{layer, ffn: dense | moe, attention (where layers differ)}] for every decoder layer."""
    layers = arch.dimensions(family, config)["layers"]
    attention = attention_kinds(family, config, layers)
    return [{"layer": layer, "ffn": "moe" if arch.is_moe_layer(family, config, layer) else "dense",
             **({"attention": attention[layer]} if attention else {})} for layer in range(layers)]


def plan_sizes(plan) -> dict:
    """A plan's output sizes as inspect counts them: {active_parameters, active_parameters_without_embedding}, or
    {} where the output's config does not say (no config, or one the table cannot size)."""
    if not plan.config:
        return {}
    try:
        family = arch.detect_family(plan.config)
        names = [tensor.name for tensor in plan.tensors]
        layout = arch.detect_expert_layout(family, names) if family.kind == "moe" else "per_expert"
        expected = arch.expected_tensors(family, plan.config, layout)
        sizes = count(family, plan.config, {t.name: math.prod(t.shape) for t in plan.tensors}, expected,
                      arch.mtp_tensors(family, plan.config, names))
    except (SurgeryError, KeyError, TypeError):
        return {}
    return {"active_parameters": sizes.active, "active_parameters_without_embedding": sizes.active_without_embedding}
