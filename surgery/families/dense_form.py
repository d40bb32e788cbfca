"""What ``surgery extract`` writes for an MoE family: its ``Family.dense_form`` (docs/extract.md).

An MoE family's ``dense_form`` is one of:

* ``None``: the dense family that converts into it and has its attention (``convert.dense_family``: Mixtral ->
  Mistral, Qwen2-MoE -> Qwen2 ...);
* an ``AllDense``: the family itself, its config saying that every layer is dense (DeepSeek-V3's
  ``first_k_dense_replace = num_hidden_layers``), where transformers has no dense counterpart but the config can
  express one;
* a string: why transformers has no dense form of it, which extract prints as its refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AllDense:
    """The same family with every layer dense: ``keys(config)`` are the config values that make every layer dense
    (the config with the family's defaults applied); ``routed_scale`` the config key of a constant the MoE multiplies
    its routed experts' output by (``routed_scaling_factor``), which the dense FFN's routed part is scaled by."""

    keys: Callable[[dict], dict]
    routed_scale: str | None = None
    width_key: str = "intermediate_size"  # the config key of the dense FFN's width (Llama 4: intermediate_size_mlp)
    # experts stored input-major (Llama 4's gate_up [H, 2I], down [I, H]): each dense FFN role -> (the expert's role,
    # which of `count` equal column blocks, count); the dense role is that block transposed. Empty: the expert's roles
    # are the dense FFN's, stored as it stores them.
    expert_roles: dict = field(default_factory=dict)
