"""Config translation, dense source -> MoE target.

What may become what is data on the families: a dense family's ``conversions`` say which MoE
formats it can become, what is refused (a source the target could not reproduce exactly), which
keys are set and copied; an MoE family's ``target_settings`` and ``moe_keys`` say what its config
holds. Every other key of the source config is carried over verbatim (rope settings in either the
4.x ``rope_theta`` / ``rope_scaling`` or the 5.x ``rope_parameters`` form, ``rms_norm_eps``,
``head_dim``, token ids ...).
"""

from __future__ import annotations

from pathlib import Path

from surgery.errors import SurgeryError
from surgery.families.base import Family, config_value
from surgery.families.registry import FAMILIES, moe_formats

# Keys never carried from a dense source into an MoE config: identity and bookkeeping.
DROPPED_KEYS = ("architectures", "model_type", "auto_map", "_name_or_path", "transformers_version",
                "pretraining_tp", "mlp_bias")


def _formats_where(test) -> str:
    return " or ".join(name for name in moe_formats() if test(FAMILIES[name]))


def moe_target(source: Family, target: str, source_config: dict, where: Path | str = "config.json") -> Family:
    """The target family for `--format` (``auto`` picks the natural one), refusing what cannot be exact."""
    name = source.default_target if target == "auto" else target
    if name not in FAMILIES or FAMILIES[name].kind != "moe":
        raise SurgeryError(f"format {target!r} is not an MoE format (expected auto, {', '.join(moe_formats())})")
    conversion = source.conversions.get(name)
    if source.kind != "dense" or conversion is None:
        allowed = sorted(source.conversions)
        raise SurgeryError(f"{where}: a {source.name} model cannot become {name} "
                           f"(formats for {source.name}: {', '.join(allowed) or 'none'})")
    for key in conversion.refuse_if:
        if config_value(source, source_config, key):
            raise SurgeryError(f"{where}: {key} is true, but {name} has no such weights, so the result could not "
                               f"reproduce the source; choose another --format")
    for key, (value, reason) in conversion.require.items():
        found = _nested(source_config, key)
        if found is not None and found != value:
            raise SurgeryError(f"{where}: {key} is {found!r}, but {reason} (it needs {value!r}), so the result "
                               f"could not reproduce the source")
    return FAMILIES[name]


def moe_config(source: Family, source_config: dict, target: Family, *, num_experts: int, top_k: int,
               expert_ffn: int, shared_ffn: int | None = None, dense_layers: list[int] | None = None) -> dict:
    """config.json for the MoE result: the source's keys verbatim, plus the target's MoE keys."""
    conversion = source.conversions[target.name]
    config = {key: value for key, value in source_config.items() if key not in DROPPED_KEYS}
    config["architectures"] = [target.architecture]
    config["model_type"] = target.name
    config.update(target.target_settings)
    config.update(conversion.set_keys)
    for target_key, source_key in conversion.copy_keys.items():
        config[target_key] = config_value(source, source_config, source_key)
    if "tie_word_embeddings" not in config:
        config["tie_word_embeddings"] = config_value(source, source_config, "tie_word_embeddings")
    keys = target.moe_keys
    config[keys["experts"][0]] = num_experts
    config[keys["top_k"][0]] = top_k
    config[keys["expert_ffn"][0]] = expert_ffn  # may be intermediate_size, where no layer is dense
    if target.sparse_layers == "qwen":
        config["decoder_sparse_step"] = 1
        config["mlp_only_layers"] = sorted(dense_layers or [])
    if "shared_ffn" in keys:
        config[keys["shared_ffn"][0]] = shared_ffn or 0
    elif shared_ffn:
        raise SurgeryError(f"format {target.name} has no shared expert "
                           f"(use --format {_formats_where(lambda f: 'shared_ffn' in f.moe_keys)})")
    if dense_layers and target.sparse_layers == "all":
        raise SurgeryError(f"format {target.name} makes every layer MoE; --moe-layers must be 'all' "
                           f"(use {_formats_where(lambda f: f.sparse_layers != 'all')} for dense layers)")
    return config


def _nested(config: dict, key: str):
    """config["a"]["b"] for key "a.b" (None where absent)."""
    value = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value
