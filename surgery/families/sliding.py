"""Sliding-window attention as each family's config.json says it: which layers slide, with which window.

``SlidingWindow`` is the rule a family module declares (``Family.sliding``); ``layer_windows`` reads a
config with it, ``windows_config`` writes the keys that make a target slide given layers. Used by
``convert`` to translate a source's sliding layers exactly or refuse before writing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from surgery.errors import SurgeryError


@dataclass(frozen=True)
class SlidingWindow:
    """Which layers attend through a sliding window, as transformers reads a family's config.json.

    ``sliding_window`` is the window (in tokens). ``switch``: a key that must be true for the window
    to take effect; off, the window becomes ``off_value``. ``per_layer``: the family reads
    ``layer_types`` (a ``"sliding_attention"`` entry slides, any other attends fully) and, where
    that is absent or null, derives it: layer ``l`` slides when ``derive(l, settings)`` holds,
    ``settings`` being the keys of ``defaults`` with ``sliding_window`` already switched;
    ``derived_from`` names the keys the derivation reads. With the switch off no derived layer
    slides (true of every family with a switch), so ``derive`` is not asked then. Otherwise one window applies to every
    layer, or none when the window is null. ``defaults``: transformers' values for absent keys (a
    key present with null is null, not its default).
    """

    defaults: dict
    switch: str | None = None
    off_value: int | None = None
    per_layer: bool = False
    derive: Callable[[int, dict], bool] | None = None
    derived_from: tuple[str, ...] = ()


# Qwen2Config and Qwen3Config (transformers 5): with the switch on, layers from max_window_layers on slide.
SLIDING_FROM_MAX_WINDOW_LAYERS = SlidingWindow(
    defaults={"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28},
    switch="use_sliding_window", per_layer=True, derived_from=("max_window_layers",),
    derive=lambda layer, s: s["sliding_window"] is not None and layer >= s["max_window_layers"])


def layer_count(config: dict, where: Path | str) -> int:
    layers = config.get("num_hidden_layers")
    if type(layers) is not int or layers <= 0:
        raise SurgeryError(f"{where}: num_hidden_layers must be a positive integer, found {layers!r}")
    return layers


def sliding_settings(family, config: dict) -> dict:
    """The keys `family.sliding` reads, absent ones at transformers' defaults, the window switched."""
    rule = family.sliding
    settings = {**rule.defaults, **{key: config[key] for key in rule.defaults if key in config}}
    if rule.switch and not settings[rule.switch]:
        settings["sliding_window"] = rule.off_value
    return settings


def layer_windows(family, config: dict, where: Path | str = "config.json") -> dict[int, object]:
    """{layer: window} for every layer that transformers builds with sliding-window attention from
    this config (empty: every layer attends fully). The window is the config's value, whatever it is."""
    rule = family.sliding
    if rule is None:
        return {}
    settings = sliding_settings(family, config)
    window = settings["sliding_window"]
    if not rule.per_layer:
        return {} if window is None else dict.fromkeys(range(layer_count(config, where)), window)
    kinds = config.get("layer_types")
    if kinds is None and rule.switch and not settings[rule.switch]:
        return {}  # derived with the switch off, no layer slides (so a config without a layer count passes)
    layers = layer_count(config, where)
    if kinds is None:
        try:
            return {layer: window for layer in range(layers) if rule.derive(layer, settings)}
        except TypeError:
            shown = ", ".join(f"{key} {settings.get(key)!r}" for key in rule.derived_from)
            raise SurgeryError(f"{where}: cannot tell which layers use a sliding window from {shown} "
                               "(expected integers)") from None
    if not isinstance(kinds, list) or len(kinds) != layers:
        raise SurgeryError(f"{where}: layer_types must list one attention kind per layer "
                           f"(num_hidden_layers {layers}), found {kinds!r}"[:300])
    return {layer: window for layer, kind in enumerate(kinds) if kind == "sliding_attention"}


def windows_config(family, windows: dict[int, object], layers: int) -> dict | None:
    """The config keys that make `family` slide exactly the layers of `windows` with their window,
    or None where its config cannot say that (one window for every layer or none, one window size)."""
    rule = family.sliding
    sizes = set(windows.values())
    if rule is None:
        return None if windows else {}
    if len(sizes) > 1 or (not rule.per_layer and 0 < len(windows) < layers):
        return None
    keys = {}
    if windows:
        keys["sliding_window"] = sizes.pop()
        if rule.switch:
            keys[rule.switch] = True
    elif rule.switch:
        keys[rule.switch] = False
    else:
        keys["sliding_window"] = None
    if rule.per_layer:
        keys["layer_types"] = ["sliding_attention" if layer in windows else "full_attention" for layer in range(layers)]
    return keys
