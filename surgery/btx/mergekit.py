"""A mergekit-moe config read as a ``MergeSpec``: every key mergekit-moe 0.1.5 reads is honoured with its
meaning or refused with a one-line reason, before anything is written; nothing is dropped silently.

mergekit-moe keys (``MoEMergeConfig`` / ``Expert`` of mergekit 0.1.5) and what they become:

* ``base_model`` -> the seed; ``experts[].source_model`` -> an expert named after its directory (made
  unique); ``shared_experts`` (at most one) -> the shared expert of a format that has one (Qwen2-MoE);
* ``positive_prompts`` (a list, or one string) -> the expert's calibration text; ``negative_prompts`` ->
  text its router row is fitted not to prefer; on the shared expert: the text its gate is fitted on;
* ``noise_scale`` -> N(0, s) added to every weight of that model's FFN, from seeded streams;
  ``residual_scale`` -> a factor on its ``down_proj``;
* ``gate_mode`` -> ``router_init``; ``experts_per_token`` -> ``top_k``; ``dtype`` -> ``dtype``;
  ``architecture`` -> the formats whose mergekit name it begins (mergekit's rule), ``deepseek`` refused;
* not read by mergekit-moe, but written in published configs (mergekit-yaml keys): ``out_dtype`` (the
  output dtype), ``tokenizer_source`` / ``tokenizer.source`` (honoured where that tokenizer is the one
  the models share, refused otherwise).

Model references are local directories (relative ones beside the YAML file); a hub id, a
``@revision`` or a ``+lora`` is refused with what to do instead. Notes that depend on settings the
command line may override are written from the final spec (``mergekit_notes``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from surgery import families
from surgery.btx.spec import (FITS_DEFAULT, REGMEAN, SEED_NAME, DomainText, MergeSpec, integer, resolve_path,
                              unknown_keys)
from surgery.errors import SurgeryError
from surgery.io.dtypes import DTYPE_ALIASES

KEYS = {"base_model", "experts", "gate_mode", "experts_per_token", "dtype", "architecture", "shared_experts",
        "tokenizer_source", "tokenizer", "out_dtype"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
GATE_MODES = {"hidden": "calibrated", "hidden_avg": "calibrated", "hidden_last": "calibrated",
              "cheap_embed": "embedding", "random": "normal", "uniform_random": "normal"}
# mergekit-moe's output architectures that surgery does not write, with the reason
REFUSED_ARCHITECTURES = {
    "deepseek moe": "mergekit's DeepSeek MoE output loads only with trust_remote_code (modeling code downloaded "
                    "from the hub); surgery writes formats transformers runs natively"}
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def architectures() -> dict[str, str]:
    """mergekit-moe's name of each output architecture surgery writes -> our format."""
    return {name: fmt for fmt in families.moe_formats() for name in families.FAMILIES[fmt].mergekit_names}


@dataclass
class Origin:
    """What a mergekit-moe config said, for notes written once the command line has had its say."""

    path: Path
    gate_mode: str
    router_init: str  # what gate_mode maps to
    places: dict = field(default_factory=dict)  # model name -> "experts[0]", "shared_experts[0]"
    prompts: bool = False  # any positive or negative prompts given
    dtype: str | None = None
    out_dtype: str | None = None
    architecture: str | None = None


def is_mergekit(data: dict) -> bool:
    experts = data.get("experts")
    return "base_model" in data or "gate_mode" in data or "shared_experts" in data or (
        isinstance(experts, list) and any(isinstance(e, dict) and "source_model" in e for e in experts))


def from_mergekit(data: dict, path: Path) -> MergeSpec:
    """Map a mergekit-moe config onto our fields; refuse what cannot keep its meaning."""
    unknown_keys(data, KEYS, f"{path} (mergekit-moe config)")
    entries = data.get("experts")
    if not isinstance(entries, list) or not entries:
        raise SurgeryError(f"{path}: 'experts' must be a list of {{source_model, positive_prompts}} entries")
    spec = MergeSpec([], non_ffn="average", notes=[])  # mergekit configs: BTX's average (see the mapping)
    gate_mode = str(data.get("gate_mode", "hidden"))
    if gate_mode not in GATE_MODES:
        raise SurgeryError(f"{path}: gate_mode {gate_mode!r} is not understood (expected {', '.join(GATE_MODES)})")
    origin = spec.origin = Origin(path, gate_mode, GATE_MODES[gate_mode])
    spec.router_init, spec.router_fit = origin.router_init, FITS_DEFAULT
    if data.get("base_model"):
        spec.seed = model_path(data["base_model"], path, "base_model")
    used = {SEED_NAME}
    for number, entry in enumerate(entries):
        spec.experts.append(_model(entry, f"experts[{number}]", path, used, spec))
    shared = data.get("shared_experts") or []
    if not isinstance(shared, list):
        raise SurgeryError(f"{path}: shared_experts must be a list of {{source_model, ...}} entries")
    if len(shared) > 1:
        raise SurgeryError(f"{path}: shared_experts lists {len(shared)} models; one shared expert at most "
                           "(mergekit-moe writes one at most too)")
    if shared:
        spec.shared = _model(shared[0], "shared_experts[0]", path, used, spec)
    spec.top_k = integer(data.get("experts_per_token", 2), f"{path}: experts_per_token")
    origin.dtype, origin.out_dtype = _dtype(data, "dtype", path), _dtype(data, "out_dtype", path)
    spec.dtype = origin.out_dtype or origin.dtype
    if data.get("architecture"):
        origin.architecture = str(data["architecture"])
        spec.format_choices = _formats(origin.architecture, path)
        if len(spec.format_choices) == 1:
            spec.format = spec.format_choices[0]
    spec.tokenizer_source = _tokenizer_source(data, path)
    return spec


def _model(entry, place: str, path: Path, used: set, spec: MergeSpec) -> tuple[str, str]:
    """(name, path) of one experts[] / shared_experts[] entry; its prompts and factors go into `spec`."""
    where = f"{path}: {place}"
    if not isinstance(entry, dict) or "source_model" not in entry:
        raise SurgeryError(f"{where}: expected a mapping with 'source_model'")
    unknown_keys(entry, EXPERT_KEYS, where)
    source = model_path(entry["source_model"], path, f"{place}.source_model")
    name = _unique_name(Path(source).name or place, used)
    spec.origin.places[name] = place
    for key, target in (("positive_prompts", spec.calibration), ("negative_prompts", spec.negative)):
        prompts = _prompts(entry.get(key), f"{where}.{key}")
        if prompts:
            target[name] = DomainText("\n".join(prompts), f"mergekit {key} of {place} ({len(prompts)})")
            spec.origin.prompts = True
    if entry.get("noise_scale") is not None:
        scale = _finite(entry["noise_scale"], f"{where}.noise_scale", minimum=0.0)
        if scale:  # 0: no noise, as in mergekit
            spec.noise_scale[name] = scale
    if entry.get("residual_scale") is not None:
        spec.residual_scale[name] = _finite(entry["residual_scale"], f"{where}.residual_scale")
    return name, source


def _prompts(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(p, (str, int, float)) for p in value):
        raise SurgeryError(f"{where}: expected a list of prompt strings, found {value!r}"[:200])
    return [str(p) for p in value]


def _finite(value, where: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SurgeryError(f"{where}: expected a finite number, found {value!r}")
    if minimum is not None and value < minimum:
        raise SurgeryError(f"{where}: expected a number >= {minimum:g}, found {value!r}")
    return float(value)


def _unique_name(name: str, used: set) -> str:
    candidate, number = name, 2
    while candidate in used:
        candidate, number = f"{name}-{number}", number + 1
    used.add(candidate)
    return candidate


def model_path(value, path: Path, key: str) -> str:
    """A mergekit model reference as a local directory (relative: beside the YAML file), or a refusal
    that says what to do: hub ids must be downloaded, LoRA adapters merged, revisions checked out."""
    where = f"{path}: {key}"
    if isinstance(value, dict):  # ModelReference's mapping form: {model: PATH or {path, revision}, lora: ...}
        unknown_keys(value, {"model", "lora", "override_architecture"}, where)
        if value.get("lora"):
            raise SurgeryError(f"{where}: lora is not supported: {_LORA}")
        if value.get("override_architecture"):
            raise SurgeryError(f"{where}: override_architecture is not supported; the architecture is read from "
                               "each model's config.json")
        model = value.get("model")
        if isinstance(model, dict):
            unknown_keys(model, {"path", "revision"}, f"{where}.model")
            if model.get("revision"):
                raise SurgeryError(f"{where}: revision {model['revision']!r}: " + _download(model.get("path")))
            model = model.get("path")
        value = model
    if not isinstance(value, str) or not value.strip():
        raise SurgeryError(f"{where}: expected a model directory, found {value!r}")
    text = value.strip()
    resolved = resolve_path(text, path.parent)
    if resolved.exists():
        return str(resolved)
    if "+" in text:
        raise SurgeryError(f"{where}: {text!r} applies a LoRA adapter (MODEL+LORA), which surgery merge does not: "
                           + _LORA)
    if "@" in text:
        model, _, revision = text.partition("@")
        raise SurgeryError(f"{where}: {text!r} names revision {revision!r} of {model!r}: " + _download(model, revision))
    if HUB_ID.fullmatch(text) and not text.startswith("."):
        raise SurgeryError(f"{where}: no directory {resolved.absolute()} (relative paths are read beside the YAML file): "
                           + _download(text))
    return str(resolved)  # opening it says what is missing


_LORA = "merge the adapter into its model first (peft: merge_and_unload, then save_pretrained) and give that directory"


def _download(model, revision: str | None = None) -> str:
    option = f" --revision {revision}" if revision else ""
    return (f"models must be local directories; if {model!r} is a Hugging Face model id, download it first "
            f"(huggingface-cli download {model}{option} --local-dir DIR) and give DIR")


def _dtype(data: dict, key: str, path: Path) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    text = str(value).removeprefix("torch.")
    if text.lower() not in DTYPE_ALIASES:
        raise SurgeryError(f"{path}: {key} {value!r} is not supported (expected bfloat16, float16 or float32)")
    return text


def _formats(architecture: str, path: Path) -> tuple[str, ...]:
    """mergekit's rule: the output architectures whose name begins with `architecture` (case-insensitive);
    our own format names are accepted as they are."""
    text = architecture.strip().lower()
    if text in families.FAMILIES and families.FAMILIES[text].kind == "moe":
        return (text,)
    known = architectures()
    found = tuple(dict.fromkeys(fmt for name, fmt in known.items() if name.startswith(text)))
    if found:
        return found
    for name, reason in REFUSED_ARCHITECTURES.items():
        if name.startswith(text):
            raise SurgeryError(f"{path}: architecture {architecture!r} ({name}) is not supported: {reason} "
                               f"(architectures: {', '.join(known)})")
    raise SurgeryError(f"{path}: architecture {architecture!r} is not one mergekit-moe writes that surgery does "
                       f"(expected one of: {', '.join(known)}, or a format: {', '.join(families.moe_formats())})")


def _tokenizer_source(data: dict, path: Path) -> str | None:
    """tokenizer_source, or tokenizer.source: 'base', 'union' or a model directory; refusing what would change
    the vocabulary (added tokens, padding the embedding)."""
    source = data.get("tokenizer_source")
    settings = data.get("tokenizer")
    if settings is not None:
        if not isinstance(settings, dict):
            raise SurgeryError(f"{path}: tokenizer must be a mapping ({', '.join(sorted(TOKENIZER_KEYS))})")
        unknown_keys(settings, TOKENIZER_KEYS, f"{path}: tokenizer")
        if settings.get("tokens"):
            raise SurgeryError(f"{path}: tokenizer.tokens is not supported: it adds or re-initialises token "
                               "embeddings, and surgery merge keeps the vocabulary the models share")
        if settings.get("pad_to_multiple_of"):
            raise SurgeryError(f"{path}: tokenizer.pad_to_multiple_of is not supported: it pads the embedding "
                               "and lm_head, and surgery merge keeps the vocabulary the models share")
        if source is not None and settings.get("source") is not None:
            raise SurgeryError(f"{path}: give tokenizer_source or tokenizer.source, not both")
        source = settings.get("source", source)
    if source is None:
        return None
    text = str(source)
    if text in ("base", "union"):
        return text
    return model_path(text.removeprefix("model:"), path, "tokenizer_source")


# ------------------------------------------------------------------ notes
GATE_NOTES = {
    "calibrated": "routers are fitted layer by layer on the merged model at the router's real input (the "
                  "post-attention norm output, padding masked) so that each expert's positive_prompts go to it"
                  "{negative}; mergekit uses the base model's hidden states of the prompts as rows",
    "embedding": "each router row is the mean input embedding of the expert's positive_prompts{negative}, centred "
                 "over the experts, unit length, the same in every layer",
    "normal": "N(0, 0.02) rows, seeded per layer (mergekit draws N(0, 1) for random, uniform(+-1/sqrt(hidden)) "
              "for uniform_random, unseeded)",
}


def mergekit_notes(spec: MergeSpec, target: str, averaged: list[str]) -> list[str]:
    """What the config's keys became, written from the final spec (after command-line overrides); `averaged`:
    the models that enter the non-FFN average."""
    origin: Origin = spec.origin
    notes = []
    if spec.router_init == origin.router_init:
        negative = {"calibrated": " and its negative_prompts do not", "embedding": " minus that of its negative_prompts"}
        notes.append(f"gate_mode {origin.gate_mode} -> router_init {spec.router_init}: " + GATE_NOTES[
            spec.router_init].format(negative=negative.get(spec.router_init, "") if spec.negative else ""))
    else:
        notes.append(f"gate_mode {origin.gate_mode} is overridden: router_init {spec.router_init}")
    if origin.prompts and spec.router_init in ("normal", "zero"):
        notes.append(f"router_init {spec.router_init} reads no text: the positive/negative prompts are not used "
                     "(mergekit's random gates ignore them too)")
    notes.append(_non_ffn_note(spec, averaged))
    for scale, places in _by_value(spec.noise_scale, origin).items():
        notes.append(f"{places}.noise_scale {scale:g}: N(0, {scale:g}) is added to every weight of the gate, up and "
                     f"down projections, as mergekit does, from seeded streams (router_seed {spec.router_seed}; "
                     "mergekit's draws are unseeded): the result changes on purpose")
    routed = {name: scale for name, scale in spec.residual_scale.items() if not spec.shared or name != spec.shared[0]}
    for scale, places in _by_value(routed, origin).items():
        notes.append(f"{places}.residual_scale {scale:g}: the down_proj is multiplied by {scale:g} (after the noise, "
                     "as mergekit does)")
    if origin.out_dtype and origin.dtype and origin.out_dtype != origin.dtype and spec.dtype == origin.out_dtype:
        notes.append(f"out_dtype {origin.out_dtype} is the output dtype (its mergekit-yaml meaning); mergekit-moe "
                     f"does not read out_dtype and would write {origin.dtype}")
    if origin.architecture and len(spec.format_choices) > 1 and spec.format == "auto":
        notes.append(f"architecture {origin.architecture!r} names {', '.join(spec.format_choices)}; these inputs "
                     f"become {target}")
    return notes


def _by_value(values: dict, origin: Origin) -> dict:
    """{value: 'experts[0], experts[2]'}: the places that give each value."""
    places: dict = {}
    for name, value in values.items():
        places.setdefault(value, []).append(origin.places[name])
    return {value: ", ".join(names) for value, names in places.items()}


def _non_ffn_note(spec: MergeSpec, averaged: list[str]) -> str:
    choice, what = spec.non_ffn, "non-FFN weights (embeddings, attention, norms, lm_head)"
    if choice == SEED_NAME:
        return f"{what} are copied from base_model, as mergekit does"
    if choice in REGMEAN:
        return f"{what} are merged by {choice} over {', '.join(averaged)} (mergekit copies base_model's)"
    if choice != "average":
        return f"{what} are copied from expert {choice} (mergekit copies base_model's)"
    if len(averaged) == 1:
        return (f"{what} are copied from {averaged[0]}, the only directory in the average"
                + ("" if averaged[0] == SEED_NAME else " (mergekit copies base_model's)"))
    base = "" if spec.seed else "no base_model: "
    return (f"{base}{what} are AVERAGED over {', '.join(averaged)} (BTX)"
            + ("; mergekit copies base_model's (pass --non-ffn seed for that)" if spec.seed else ""))
