"""The model families: everything about one family lives in one module of this package.

Every difference between architectures is data. ``base`` defines what a family is made of
(``Spec`` rows: a role, a group, a tensor-name template with ``{layer}`` / ``{expert}``
placeholders, a shape in named dimensions, an optional condition on a config key), the row groups
families share, the shape logic (``dimensions``, ``expected_tensors``, ``is_moe_layer`` ...) and the
reading of sliding-window keys (``SlidingWindow``, ``layer_windows``: which layers transformers makes
slide).
Each family module (``llama``, ``qwen2_moe`` ..., named by the HF ``model_type``) declares one
``FAMILY``: its rows, its defaults, and for a dense family the MoE formats it can become (its
``Conversion``s) and the one ``--format auto`` picks, for an MoE family its config keys and
settings. ``registry`` finds the family modules by listing this package and assembles them;
``convert`` translates a dense config into an MoE one. Together the families are the table of
tensor names and shapes every operation consults ("the table" in comments elsewhere).

Adding a family is adding one module here (plus its tiny model in tests/tiny_models.py); no code
outside the family modules names a family (tests/test_families.py scans for it). Importing this
package is cheap: no torch, no transformers.
"""

from surgery.families.base import (BASE_DEFAULTS, DENSE_FFN, FUSED_EXPERTS, FUSED_PARTS, GLOBAL, NORMS, O_BIAS,
                                    QK_NORM, QKVO, QWEN_SPARSE_DEFAULTS, Conversion, Expected, Family, FusedSource, L,
                                    Spec, config_value, detect_expert_layout, dimensions, expected_tensors,
                                    is_moe_layer, moe_layers, per_expert, qkv_bias, shape_of, source_views, specs)
from surgery.families.convert import DROPPED_KEYS, moe_config, moe_target
from surgery.families.moe_layers import (after_first_k_dense, every_layer, listed_or_interleaved, moe_interval,
                                         mtp_tensors, qwen_layers, renormalises_top_k, route_groups, router_specs,
                                         routing_of)
from surgery.families.nesting import Nesting
from surgery.families.registry import (CONVERSIONS, DEFAULT_TARGET, FAMILIES, NESTINGS, TARGET_SETTINGS,
                                       auto_formats, detect_family, family_modules, moe_formats, nesting_of, supported,
                                       text_view)
from surgery.families.sliding import SLIDING_FROM_MAX_WINDOW_LAYERS, SlidingWindow, layer_windows, windows_config

__all__ = [
    "BASE_DEFAULTS", "CONVERSIONS", "Conversion", "DEFAULT_TARGET", "DENSE_FFN", "DROPPED_KEYS", "Expected",
    "FAMILIES", "FUSED_EXPERTS", "NESTINGS", "Nesting", "FUSED_PARTS", "Family", "FusedSource", "GLOBAL", "L", "NORMS", "O_BIAS", "QKVO",
    "QK_NORM", "QWEN_SPARSE_DEFAULTS", "SLIDING_FROM_MAX_WINDOW_LAYERS", "SlidingWindow", "Spec", "TARGET_SETTINGS",
    "after_first_k_dense", "auto_formats", "config_value", "detect_expert_layout", "detect_family", "dimensions",
    "every_layer", "expected_tensors", "family_modules", "is_moe_layer", "layer_windows", "moe_config",
    "moe_formats", "moe_interval", "moe_layers", "moe_target", "mtp_tensors", "nesting_of", "per_expert", "qkv_bias",
    "listed_or_interleaved", "qwen_layers", "renormalises_top_k", "route_groups", "router_specs", "routing_of", "shape_of", "source_views", "specs",
    "supported", "text_view", "windows_config",
]
