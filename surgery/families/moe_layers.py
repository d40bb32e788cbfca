"""The MoE half of a family's table: which layers hold experts (the rules families declare as
``Family.sparse_layers``), the router's stored tensors (``router_specs``), how it groups experts
(``route_groups``) and renormalises (``renormalises_top_k``), and the multi-token-prediction tensors stored beside
the model (``mtp_tensors``).

A rule takes ``value`` (a config key -> its value, the family's default where the key is absent) and a layer
index, and says what transformers' decoder layer decides for that layer.
"""

from __future__ import annotations


def every_layer(value, layer: int) -> bool:
    return True


def qwen_layers(value, layer: int) -> bool:
    """Qwen2/3-MoE, Qwen3-Next: MoE unless listed in ``mlp_only_layers``, and when (l + 1) % ``decoder_sparse_step`` == 0."""
    return layer not in (value("mlp_only_layers") or []) and (layer + 1) % (value("decoder_sparse_step") or 1) == 0


def after_first_k_dense(value, layer: int) -> bool:
    """DeepSeek-V2/V3, GLM-4.5: the first ``first_k_dense_replace`` layers are dense."""
    return layer >= (value("first_k_dense_replace") or 0)


def moe_interval(value, layer: int) -> bool:
    """ERNIE 4.5: every ``moe_layer_interval``-th layer from ``moe_layer_start_index`` to ``moe_layer_end_index``."""
    end = value("moe_layer_end_index")
    end = end if end is not None and end >= 0 else layer
    return (layer + 1) % (value("moe_layer_interval") or 1) == 0 and value("moe_layer_start_index") <= layer <= end


def route_groups(family, config: dict) -> tuple[int, int]:
    """(expert groups, groups a token may use) under group-limited routing (``Family.group_keys``, switched on by
    ``Family.group_when`` where given); (1, 1) without it."""
    if family.group_keys is None:
        return 1, 1
    def value(key):
        return config[key] if config.get(key) is not None else family.defaults.get(key)
    if family.group_when is not None and value(family.group_when[0]) != family.group_when[1]:
        return 1, 1
    count, used = (value(key) or 1 for key in family.group_keys)
    return int(count), int(used)


def renormalises_top_k(family, config: dict) -> bool:
    """Whether the router renormalises its top-k weights to sum to 1: its switch (``Family.top_k_norm``), or what it
    always does (``Family.top_k_renormalised``)."""
    if family.top_k_norm is None:
        return family.top_k_renormalised
    value = config.get(family.top_k_norm)
    return bool(value if value is not None else family.defaults.get(family.top_k_norm))


def router_specs(family, layout: str) -> tuple:
    """The router's stored tensors in `layout`: its weight, then its per-expert extras (bias, correction bias)."""
    fused = layout == "fused"
    weight = (family.fused_router or family.router) if fused else family.router
    extras = (family.fused_router_tensors or family.router_tensors) if fused else family.router_tensors
    return (weight, *extras)


def mtp_tensors(family, config: dict, names) -> list[str]:
    """The stored tensors among `names` that belong to multi-token-prediction layers (``Family.mtp_prefixes``)."""
    if family.mtp_prefixes is None:
        return []
    prefixes = tuple(family.mtp_prefixes({**family.defaults, **config}))
    return [name for name in names if prefixes and name.startswith(prefixes)]


def listed_or_interleaved(value, layer: int) -> bool:
    """Llama 4: the layers ``moe_layers`` lists; where it is absent, every ``interleave_moe_layer_step``-th layer
    (``step - 1``, ``2 step - 1`` ...)."""
    listed = value("moe_layers")
    if listed is not None:
        return layer in listed
    step = value("interleave_moe_layer_step") or 1
    return (layer + 1) % step == 0


def routing_of(family, outputs: tuple, top_k: int) -> tuple:
    """(logits, weights, chosen experts) from the tuple a family's router returns (``Family.router_outputs``):
    transformers 5's routers return those three; Llama 4's returns (scores, logits), the scores [tokens, E] the
    sigmoid of the top-k logits and 0 elsewhere, from which the chosen experts (the logits' top-k, as its router
    takes them) and their weights are read. Anything else: (logits,), the rest computed by the caller."""
    if family.router_outputs == ("scores", "logits") and len(outputs) >= 2:
        scores, logits = outputs[0], outputs[1]
        chosen = logits.topk(top_k, dim=-1).indices
        return logits, scores.gather(-1, chosen), chosen
    return tuple(outputs)
