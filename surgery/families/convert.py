"""Config translation, dense source -> MoE target, and MoE -> its dense form (``surgery extract``).

What may become what is data on the families: a dense family's ``conversions`` say which MoE
formats it can become, what is refused (a source the target could not reproduce exactly), which
keys are set and copied; an MoE family's ``target_settings`` and ``moe_keys`` say what its config
holds. Every other key of the source config is carried over verbatim (rope settings in either the
4.x ``rope_theta`` / ``rope_scaling`` or the 5.x ``rope_parameters`` form, ``rms_norm_eps``,
``head_dim``, token ids ...).

Sliding-window attention is translated, not carried: the families' ``sliding`` rules say which layers
transformers makes slide, with which window, for a config of theirs. Where the target would read the
carried keys otherwise than the source does (Qwen2-MoE derives ``layer_types`` differently from
Qwen2, Mixtral has no window where Mistral's default is 4096), the keys are rewritten so that the
same layers slide with the same window; where the target cannot say it (Qwen3-MoE slides every layer
or none), the source is refused before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from surgery.errors import SurgeryError
from surgery.families.base import Family, config_value
from surgery.families.dense_form import AllDense
from surgery.families.moe_layers import every_layer, qwen_layers
from surgery.families.registry import FAMILIES, moe_formats
from surgery.families.sliding import layer_count, layer_windows, sliding_settings, windows_config

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
    _sliding_keys(source, source_config, FAMILIES[name], _carried(source, source_config, FAMILIES[name]), where)
    return FAMILIES[name]


def _layers(layers) -> str:
    """'layer 3', 'layers 1-3', 'layers 0, 2'."""
    layers = sorted(layers)
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}"
    return "layers " + ", ".join(map(str, layers))


def _sliding_cause(source: Family, source_config: dict) -> str:
    """The source keys that decide which of its layers slide, as '... so' / 'layer_types says'."""
    rule = source.sliding
    if rule.per_layer and source_config.get("layer_types") is not None:
        return "layer_types says"
    settings = sliding_settings(source, source_config)
    said = [f"{rule.switch} is true"] if rule.switch else []
    said += [f"{key} is {settings[key]!r}" for key in (rule.derived_from if rule.per_layer else ())]
    return " and ".join(said or ["sliding_window is set"]) + ", so"


def _sliding_keys(source: Family, source_config: dict, target: Family, config: dict, where: Path | str) -> dict:
    """The keys that make `target`, built from `config`, slide the layers the source slides with its window
    (empty when it already does), or a refusal where the target's config cannot say that."""
    windows = layer_windows(source, source_config, where)
    window = next(iter(windows.values()), 1)
    if type(window) is not int or window <= 0:  # every sliding layer of a source has the same window
        switch = source.sliding.switch
        if switch and not sliding_settings(source, source_config)[switch]:
            raise SurgeryError(f"{where}: layer_types makes {_layers(windows)} attend through a sliding window, but "
                               f"{switch} is false, so no window is in effect and transformers cannot run the model")
        raise SurgeryError(f"{where}: sliding_window must be a positive integer, found {window!r}")
    if layer_windows(target, config, where) == windows:
        return {}
    layers = layer_count(source_config, where)  # one of the two has a sliding layer: the count was read
    keys = windows_config(target, windows, layers)
    if keys is not None and layer_windows(target, {**config, **keys}, where) == windows:
        return keys
    sizes = sorted(set(windows.values()))
    full = [layer for layer in range(layers) if layer not in windows]
    rest = f" and {_layers(full)} {'attends' if len(full) == 1 else 'attend'} fully" if full else ""
    rule = target.sliding
    why = (f"{target.name} has no sliding-window attention" if rule is None else
           f"{target.name} applies one sliding window to every layer or to none" if not rule.per_layer else
           f"{target.name} has one sliding_window for all its sliding layers")
    raise SurgeryError(f"{where}: {_sliding_cause(source, source_config)} {_layers(windows)} of {layers} "
                       f"{'attends' if len(windows) == 1 else 'attend'} through a sliding window of "
                       f"{' / '.join(map(str, sizes))}{rest}, but {why}, so the result could not reproduce the source")


def _carried(source: Family, source_config: dict, target: Family) -> dict:
    """The source's keys verbatim, the target's identity and settings, the conversion's keys."""
    conversion = source.conversions[target.name]
    config = {key: value for key, value in source_config.items() if key not in DROPPED_KEYS}
    config["architectures"] = [target.architecture]
    config["model_type"] = target.name
    config.update(target.target_settings)
    config.update(conversion.set_keys)
    for target_key, source_key in conversion.copy_keys.items():
        config[target_key] = config_value(source, source_config, source_key)
    return config


def moe_config(source: Family, source_config: dict, target: Family, *, num_experts: int, top_k: int,
               expert_ffn: int, shared_ffn: int | None = None, dense_layers: list[int] | None = None,
               where: Path | str = "config.json") -> dict:
    """config.json for the MoE result: the source's keys verbatim, the sliding-window keys translated,
    plus the target's MoE keys."""
    config = _carried(source, source_config, target)
    config.update(_sliding_keys(source, source_config, target, config, where))
    if "tie_word_embeddings" not in config:
        config["tie_word_embeddings"] = config_value(source, source_config, "tie_word_embeddings")
    keys = target.moe_keys
    config[keys["experts"][0]] = num_experts
    config[keys["top_k"][0]] = top_k
    config[keys["expert_ffn"][0]] = expert_ffn  # may be intermediate_size, where no layer is dense
    if target.sparse_layers is qwen_layers:
        config["decoder_sparse_step"] = 1
        config["mlp_only_layers"] = sorted(dense_layers or [])
    if "shared_ffn" in keys:
        config[keys["shared_ffn"][0]] = shared_ffn or 0
    elif shared_ffn:
        raise SurgeryError(f"format {target.name} has no shared expert "
                           f"(use --format {_formats_where(lambda f: 'shared_ffn' in f.moe_keys)})")
    if dense_layers and target.sparse_layers is every_layer:
        raise SurgeryError(f"format {target.name} makes every layer MoE; --moe-layers must be 'all' "
                           f"(use {_formats_where(lambda f: f.sparse_layers is not every_layer)} for dense layers)")
    return config


def _nested(config: dict, key: str):
    """config["a"]["b"] for key "a.b" (None where absent)."""
    value = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


# ------------------------------------------------------------------- MoE -> dense (surgery extract)
def extract_target(moe: Family, where: Path | str = "config.json") -> Family:
    """The family ``surgery extract`` writes (``Family.dense_form``): the dense family that converts into `moe`, or
    `moe` itself with every layer dense (an ``AllDense``); refused, saying why, where transformers has neither."""
    if isinstance(moe.dense_form, str):
        raise SurgeryError(f"{where}: extract: a {moe.architecture} has no dense form in transformers "
                           f"({moe.dense_form})")
    return moe if isinstance(moe.dense_form, AllDense) else dense_family(moe, where)


def all_dense_config(moe: Family, moe_config_: dict, intermediate_size: int) -> dict:
    """config.json for an extract that keeps the family (an ``AllDense`` dense form): the MoE's keys verbatim, the
    ones that make every layer dense, and its width key (``intermediate_size``: one width for every layer's FFN)."""
    config = dict(moe_config_)
    config.update(moe.dense_form.keys({**moe.defaults, **moe_config_}))
    config[moe.dense_form.width_key] = intermediate_size
    return config


def routed_scale(moe: Family, moe_config_: dict) -> tuple[str | None, float]:
    """(config key, value) of the constant the MoE multiplies its routed experts' output by (DeepSeek's
    ``routed_scaling_factor``); (None, 1.0) where it has none."""
    key = moe.dense_form.routed_scale if isinstance(moe.dense_form, AllDense) else None
    value = config_value(moe, moe_config_, key) if key else None
    return key, float(1.0 if value is None else value)


def dense_family(moe: Family, where: Path | str = "config.json") -> Family:
    """The dense family an MoE family extracts to: the one that converts into it and has its attention
    (Mixtral -> Mistral, Qwen2-MoE -> Qwen2, GraniteMoE and GraniteMoeShared -> Granite ...)."""
    found = [family for family in FAMILIES.values()
             if family.kind == "dense" and moe.name in family.conversions and family.attention == moe.attention]
    if moe.kind != "moe" or not found:
        raise SurgeryError(f"{where}: {moe.architecture} has no dense family to extract to")
    return found[0]


def dense_config(moe: Family, moe_config_: dict, dense: Family, intermediate_size: int,
                 where: Path | str = "config.json") -> dict:
    """config.json for a dense extract of an MoE: the MoE's keys verbatim minus its MoE keys (expert counts
    and sizes, router settings, dense-layer keys), the dense family's identity, ``intermediate_size``,
    defaults the two families read differently written out, the sliding-window keys translated."""
    moe_only = {key for keys in moe.moe_keys.values() for key in keys} | set(moe.target_settings)
    moe_only |= {key for key in moe.defaults if key not in dense.defaults}  # mlp_only_layers, decoder_sparse_step
    if moe.top_k_norm:
        moe_only.add(moe.top_k_norm)
    config = {key: value for key, value in moe_config_.items() if key not in moe_only and key not in DROPPED_KEYS}
    config["architectures"] = [dense.architecture]
    config["model_type"] = dense.name
    for key, value in dense.defaults.items():
        if key not in config and key in moe.defaults and moe.defaults[key] != value:
            config[key] = moe.defaults[key]
    config["intermediate_size"] = intermediate_size
    if "tie_word_embeddings" not in config:
        config["tie_word_embeddings"] = config_value(moe, moe_config_, "tie_word_embeddings")
    config.update(_sliding_keys(moe, moe_config_, dense, config, where))
    return config
