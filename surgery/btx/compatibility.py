"""Can these models be merged? Architecture, every tensor, forward-pass config keys, tokenizer.

Branch-Train-MiX only makes sense for copies of one seed model: the non-FFN weights are averaged
and every FFN becomes an expert behind one shared attention stack, one embedding and one
tokenizer. ``check_compatible`` refuses anything else before a byte is written, with a one-line
``SurgeryError`` that names the two models, the differing key (config key, tensor or tokenizer
file) and both values.

Config keys are compared after normalisation, so that the same model saved by transformers 4.x
and 5.x compares equal: rope settings in the 4.x form (``rope_theta`` + ``rope_scaling``) and the
5.x form (``rope_parameters``) become one dict; ``head_dim: null`` becomes hidden/heads;
``layer_types`` of only full attention is dropped; a key absent from one config is compared
with its known default. Bookkeeping keys (dtype, ``_name_or_path``, ``use_cache`` ...) are ignored:
every other key is assumed to change the forward pass and must be equal.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.io.checkpoint import Checkpoint

# Keys that never change what the model computes: identity, storage, generation and training knobs.
IGNORED_KEYS = frozenset({
    "_name_or_path", "name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache",
    "initializer_range", "output_attentions", "output_hidden_states", "return_dict", "attn_implementation",
    "_attn_implementation", "_attn_implementation_autoset", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "finetuning_task",
    "task_specific_params", "max_length", "min_length", "do_sample", "temperature", "top_k", "top_p",
    "num_beams", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "early_stopping",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "remove_invalid_values",
    "pretraining_tp",  # sliced matmuls in old Llama code: the same function
    "auto_map", "quantization_config",
})
# Values assumed for a forward-pass key that one config omits (transformers' defaults for these families).
KEY_DEFAULTS = {
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
    "tie_word_embeddings": False, "pad_token_id": None, "sliding_window": None, "use_sliding_window": False,
}
RAW_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")
DEFAULT_ROPE_THETA = 10000.0

# Files that define tokenisation. tokenizer_config.json is compared as JSON without its path fields.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json",
                   "special_tokens_map.json", "tokenizer_config.json")
TOKENIZER_CONFIG_IGNORED = ("name_or_path", "_name_or_path", "tokenizer_file")


@dataclass
class Member:
    """One model taking part in a merge."""

    name: str
    checkpoint: Checkpoint
    family: arch.Family


def rope_settings(config: dict) -> dict:
    """Rope settings in one canonical form, whichever transformers version wrote the config."""
    merged = dict(config.get("rope_scaling") or {})
    parameters = config.get("rope_parameters") or {}
    if isinstance(parameters, dict) and parameters and all(isinstance(v, dict) for v in parameters.values()):
        return {key: rope_settings({"rope_parameters": value, "rope_theta": config.get("rope_theta")})
                for key, value in sorted(parameters.items())}  # per layer type (5.x)
    merged.update(parameters)
    if "type" in merged:
        merged.setdefault("rope_type", merged["type"])
        del merged["type"]
    theta = merged.get("rope_theta", config.get("rope_theta"))
    merged["rope_theta"] = float(theta if theta is not None else DEFAULT_ROPE_THETA)
    merged["rope_type"] = merged.get("rope_type") or "default"
    return {key: merged[key] for key in sorted(merged)}


def forward_config(family: arch.Family, config: dict) -> dict:
    """The config keys that decide the forward pass, normalised for comparison."""
    out = {key: value for key, value in config.items() if key not in IGNORED_KEYS and key not in RAW_ROPE_KEYS}
    out["rope"] = rope_settings(config)
    dims = arch.dimensions(family, config)
    out["head_dim"] = dims["head_dim"]
    out["num_key_value_heads"] = dims["kv_heads"]
    if out.get("layer_types") and all(kind == "full_attention" for kind in out["layer_types"]):
        del out["layer_types"]
    for key, value in family.defaults.items():
        out.setdefault(key, value)
    return out


def _show(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def check_configs(reference: Member, other: Member) -> None:
    ref = forward_config(reference.family, reference.checkpoint.config)
    found = forward_config(other.family, other.checkpoint.config)
    missing = object()
    for key in sorted(set(ref) | set(found)):
        a, b = ref.get(key, missing), found.get(key, missing)
        a = KEY_DEFAULTS.get(key) if a is missing else a
        b = KEY_DEFAULTS.get(key) if b is missing else b
        if a != b:
            shown = "rope settings (rope_theta / rope_scaling / rope_parameters)" if key == "rope" else key
            raise SurgeryError(f"{other.checkpoint.directory / 'config.json'}: {shown} is {_show(b)} in {other.name}, "
                               f"but {_show(a)} in {reference.name}; merged models must share every forward-pass "
                               "setting")


def check_tensors(reference: Member, other: Member) -> None:
    ref, found = reference.checkpoint.tensors, other.checkpoint.tensors
    for name, info in ref.items():
        if name not in found:
            raise SurgeryError(f"{other.checkpoint.directory}: tensor {name!r} is missing in {other.name} "
                               f"(present in {reference.name})")
        if tuple(found[name].shape) != tuple(info.shape):
            raise SurgeryError(f"{found[name].file}: tensor {name!r} has shape {list(found[name].shape)} in {other.name}, "
                               f"but {list(info.shape)} in {reference.name}")
    extra = [name for name in found if name not in ref]
    if extra:
        raise SurgeryError(f"{other.checkpoint.directory}: tensor {extra[0]!r} is in {other.name} but not in "
                           f"{reference.name}")


def tokenizer_fingerprint(directory) -> dict[str, str]:
    """{file name: sha256 of its content} for the tokenizer files a model directory holds."""
    out = {}
    for name in TOKENIZER_FILES:
        path = directory / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if name == "tokenizer_config.json":
            try:
                parsed = json.loads(data)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise SurgeryError(f"{path}: not valid JSON") from None
            if isinstance(parsed, dict):
                for key in TOKENIZER_CONFIG_IGNORED:
                    parsed.pop(key, None)
            data = json.dumps(parsed, sort_keys=True).encode()
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def check_tokenizers(members: list[Member]) -> list[str]:
    """Refuse tokenizers whose files differ; returns notes for models that ship no tokenizer."""
    prints = [(member, tokenizer_fingerprint(member.checkpoint.directory)) for member in members]
    with_tokenizer = [(member, found) for member, found in prints if found]
    notes = [f"{member.name} ({member.checkpoint.directory}) has no tokenizer files; its vocabulary is checked by "
             "config only" for member, found in prints if not found and with_tokenizer]
    if not with_tokenizer:
        return notes
    reference, ref_print = with_tokenizer[0]
    for member, found in with_tokenizer[1:]:
        for name in sorted(set(ref_print) | set(found)):
            if name not in found or name not in ref_print:
                holder, lacker = (reference, member) if name in ref_print else (member, reference)
                raise SurgeryError(f"{lacker.checkpoint.directory}: tokenizer file {name} is missing in {lacker.name} "
                                   f"but present in {holder.name}; merged models must share one tokenizer")
            if found[name] != ref_print[name]:
                raise SurgeryError(f"{member.checkpoint.directory / name}: tokenizer file {name} differs between "
                                   f"{member.name} and {reference.name} (compared by content); merged models must "
                                   "share one tokenizer")
    return notes


def check_compatible(members: list[Member]) -> list[str]:
    """Refuse models that cannot be merged; returns notes (e.g. differing storage dtypes)."""
    reference = members[0]
    notes = []
    for other in members[1:]:
        if other.family.name != reference.family.name:
            raise SurgeryError(f"{other.checkpoint.directory / 'config.json'}: architecture is "
                               f"{other.family.architecture} in {other.name}, but {reference.family.architecture} in "
                               f"{reference.name}")
        check_configs(reference, other)
        check_tensors(reference, other)
        dtypes = {info.dtype for info in other.checkpoint.tensors.values()}
        ref_dtypes = {info.dtype for info in reference.checkpoint.tensors.values()}
        if dtypes != ref_dtypes:
            notes.append(f"{other.name} is stored as {'/'.join(sorted(dtypes))}, {reference.name} as "
                         f"{'/'.join(sorted(ref_dtypes))}; averages are computed in float32")
    return notes + check_tokenizers(members)
