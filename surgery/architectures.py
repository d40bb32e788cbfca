"""The architecture table: tensor-name templates, shapes and config rules per model family.

Every difference between architectures lives in this file as data. A family lists its tensors
as ``Spec`` rows: a role (``q``, ``gate``, ``router`` ...), the group it belongs to (attention,
ffn, experts ...), a name template with ``{layer}`` / ``{expert}`` placeholders, a shape written in
named dimensions (derived from config.json by ``dimensions``) and an optional condition on a
config key. Operations ask the table for names and shapes; they never spell tensor names.

Config translation (dense source -> MoE target) is data too: ``CONVERSIONS`` says which source
families may become which target, what is refused, which keys are set, and every other key of
the source config is carried over verbatim (rope settings in either the 4.x ``rope_theta`` /
``rope_scaling`` or the 5.x ``rope_parameters`` form, ``rms_norm_eps``, ``head_dim``, token ids ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import SurgeryError


@dataclass(frozen=True)
class Spec:
    role: str
    group: str
    template: str
    shape: tuple[str, ...]
    when: str | None = None  # config key that must be truthy; "not KEY" for falsy

    def name(self, layer: int | None = None, expert: int | None = None) -> str:
        return self.template.format(layer=layer, expert=expert)


def _specs(group: str, prefix: str, rows) -> tuple[Spec, ...]:
    return tuple(Spec(role, group, prefix + suffix, shape, *rest) for role, suffix, shape, *rest in rows)


L = "model.layers.{layer}."

GLOBAL = _specs("embedding", "", [("embed", "model.embed_tokens.weight", ("vocab", "hidden"))]) + (
    Spec("final_norm", "norm", "model.norm.weight", ("hidden",)),
    Spec("lm_head", "head", "lm_head.weight", ("vocab", "hidden"), "not tie_word_embeddings"),
)
QKVO = [
    ("q", "self_attn.q_proj.weight", ("q_dim", "hidden")),
    ("k", "self_attn.k_proj.weight", ("kv_dim", "hidden")),
    ("v", "self_attn.v_proj.weight", ("kv_dim", "hidden")),
    ("o", "self_attn.o_proj.weight", ("hidden", "q_dim")),
]
NORMS = _specs("norm", L, [
    ("input_norm", "input_layernorm.weight", ("hidden",)),
    ("post_attention_norm", "post_attention_layernorm.weight", ("hidden",)),
])


def _qkv_bias(key: str) -> list:
    return [("q_bias", "self_attn.q_proj.bias", ("q_dim",), key),
            ("k_bias", "self_attn.k_proj.bias", ("kv_dim",), key),
            ("v_bias", "self_attn.v_proj.bias", ("kv_dim",), key)]


O_BIAS = [("o_bias", "self_attn.o_proj.bias", ("hidden",), "attention_bias")]
QK_NORM = [("q_norm", "self_attn.q_norm.weight", ("head_dim",)), ("k_norm", "self_attn.k_norm.weight", ("head_dim",))]

DENSE_FFN = _specs("ffn", L, [
    ("gate", "mlp.gate_proj.weight", ("ffn", "hidden")),
    ("up", "mlp.up_proj.weight", ("ffn", "hidden")),
    ("down", "mlp.down_proj.weight", ("hidden", "ffn")),
    ("gate_bias", "mlp.gate_proj.bias", ("ffn",), "mlp_bias"),
    ("up_bias", "mlp.up_proj.bias", ("ffn",), "mlp_bias"),
    ("down_bias", "mlp.down_proj.bias", ("hidden",), "mlp_bias"),
])


def _experts(prefix: str, gate: str, up: str, down: str) -> tuple[Spec, ...]:
    return _specs("experts", L + prefix + "experts.{expert}.", [
        ("gate", gate + ".weight", ("expert_ffn", "hidden")),
        ("up", up + ".weight", ("expert_ffn", "hidden")),
        ("down", down + ".weight", ("hidden", "expert_ffn")),
    ])


# transformers 5 keeps experts fused in memory and may save them that way: the fused layout is also
# the in-memory layout that layer-by-layer execution builds. FUSED_PARTS: which per-expert roles a
# fused role stacks, in order along its second dimension (gate rows first, then up).
FUSED_PARTS = {"gate_up": ("gate", "up"), "down": ("down",)}
FUSED_EXPERTS = _specs("experts", L, [
    ("gate_up", "mlp.experts.gate_up_proj", ("experts", "2*expert_ffn", "hidden")),
    ("down", "mlp.experts.down_proj", ("experts", "hidden", "expert_ffn")),
])
QWEN_SHARED_EXPERT = _specs("shared_expert", L + "mlp.", [
    ("gate", "shared_expert.gate_proj.weight", ("shared_ffn", "hidden")),
    ("up", "shared_expert.up_proj.weight", ("shared_ffn", "hidden")),
    ("down", "shared_expert.down_proj.weight", ("hidden", "shared_ffn")),
    ("shared_gate", "shared_expert_gate.weight", ("1", "hidden")),
])


@dataclass(frozen=True)
class Family:
    name: str  # == HF model_type
    architecture: str  # HF class in config.architectures
    kind: str  # "dense" or "moe"
    attention: tuple[Spec, ...]  # every layer: attention + norms
    dense_ffn: tuple[Spec, ...] = DENSE_FFN  # a dense layer's FFN
    router: Spec | None = None
    fused_router: Spec | None = None  # the router's name in the fused (in-memory) layout, when it differs
    experts: tuple[Spec, ...] = ()  # per-expert layout, {expert} in the template
    fused_experts: tuple[Spec, ...] = ()
    shared_expert: tuple[Spec, ...] = ()
    defaults: dict = field(default_factory=dict)  # config values assumed when a key is absent
    moe_keys: dict = field(default_factory=dict)  # dimension -> config key(s), first present wins
    sparse_layers: str = "all"  # "all", or "qwen" (mlp_only_layers + decoder_sparse_step)
    # The router of an MoE layer reads the input of the module holding the layer's FFN or MoE block
    # (transformers' `mlp`: the post-attention norm output in pre-norm families); calibration
    # captures that input, for dense sources too, where a future router will read it.
    router_input: str = "mlp"
    # transformers' attention module of a decoder layer: its output (first element) is what a stopped pass
    # keeps so the layer's full run can reuse it instead of computing attention again
    attention_module: str = "self_attn"

    def spec(self, group: str, role: str) -> Spec:
        pool = {"ffn": self.dense_ffn, "experts": self.experts, "shared_expert": self.shared_expert,
                "fused_experts": self.fused_experts, "router": (self.router,) if self.router else ()}.get(group)
        pool = pool if pool is not None else GLOBAL + self.attention
        for spec in pool:
            if spec.role == role:
                return spec
        raise KeyError(f"{self.name} has no tensor role {group}/{role}")


_BASE_DEFAULTS = {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}

FAMILIES: dict[str, Family] = {
    family.name: family for family in [
        Family("llama", "LlamaForCausalLM", "dense",
               _specs("attention", L, QKVO + _qkv_bias("attention_bias") + O_BIAS) + NORMS,
               defaults=_BASE_DEFAULTS),
        Family("mistral", "MistralForCausalLM", "dense", _specs("attention", L, QKVO) + NORMS,
               defaults=_BASE_DEFAULTS),
        Family("qwen2", "Qwen2ForCausalLM", "dense", _specs("attention", L, QKVO + _qkv_bias("qkv_bias")) + NORMS,
               defaults={**_BASE_DEFAULTS, "qkv_bias": True}),
        Family("qwen3", "Qwen3ForCausalLM", "dense",
               _specs("attention", L, QKVO + _qkv_bias("attention_bias") + O_BIAS + QK_NORM) + NORMS,
               defaults=_BASE_DEFAULTS),
        Family("mixtral", "MixtralForCausalLM", "moe", _specs("attention", L, QKVO) + NORMS,
               dense_ffn=(),
               router=Spec("router", "router", L + "block_sparse_moe.gate.weight", ("experts", "hidden")),
               fused_router=Spec("router", "router", L + "mlp.gate.weight", ("experts", "hidden")),
               experts=_experts("block_sparse_moe.", "w1", "w3", "w2"),
               fused_experts=FUSED_EXPERTS,
               defaults=_BASE_DEFAULTS,
               moe_keys={"experts": ("num_local_experts",), "top_k": ("num_experts_per_tok",),
                         "expert_ffn": ("intermediate_size",)}),
        Family("qwen2_moe", "Qwen2MoeForCausalLM", "moe", _specs("attention", L, QKVO + _qkv_bias("qkv_bias")) + NORMS,
               router=Spec("router", "router", L + "mlp.gate.weight", ("experts", "hidden")),
               experts=_experts("mlp.", "gate_proj", "up_proj", "down_proj"),
               fused_experts=FUSED_EXPERTS,
               shared_expert=QWEN_SHARED_EXPERT,
               defaults={**_BASE_DEFAULTS, "qkv_bias": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
               moe_keys={"experts": ("num_experts",), "top_k": ("num_experts_per_tok",),
                         "expert_ffn": ("moe_intermediate_size",), "shared_ffn": ("shared_expert_intermediate_size",)},
               sparse_layers="qwen"),
        Family("qwen3_moe", "Qwen3MoeForCausalLM", "moe",
               _specs("attention", L, QKVO + _qkv_bias("attention_bias") + O_BIAS + QK_NORM) + NORMS,
               router=Spec("router", "router", L + "mlp.gate.weight", ("experts", "hidden")),
               experts=_experts("mlp.", "gate_proj", "up_proj", "down_proj"),
               fused_experts=FUSED_EXPERTS,
               defaults={**_BASE_DEFAULTS, "decoder_sparse_step": 1, "mlp_only_layers": []},
               moe_keys={"experts": ("num_experts", "num_local_experts"), "top_k": ("num_experts_per_tok",),
                         "expert_ffn": ("moe_intermediate_size",)},
               sparse_layers="qwen"),
    ]
}


def supported() -> str:
    return ", ".join(f"{f.architecture} ({f.name})" for f in FAMILIES.values())


def detect_family(config: dict, where: Path | str = "config.json") -> Family:
    architectures = config.get("architectures") or []
    for family in FAMILIES.values():
        if architectures and architectures[0] == family.architecture:
            return family
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    found = architectures[0] if architectures else model_type
    raise SurgeryError(f"{where}: architecture {found!r} is not supported (supported: {supported()})")


def config_value(family: Family, config: dict, key: str):
    return config[key] if config.get(key) is not None else family.defaults.get(key)


def _moe_value(family: Family, config: dict, dimension: str):
    for key in family.moe_keys.get(dimension, ()):
        if config.get(key) is not None:
            return config[key]
    return None


def dimensions(family: Family, config: dict, where: Path | str = "config.json") -> dict[str, int]:
    """Named sizes used by the shape column of the table, derived from config.json and checked."""
    def need(key):
        value = config.get(key)
        if type(value) is not int or value <= 0:
            raise SurgeryError(f"{where}: {key} must be a positive integer, found {value!r}")
        return value

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    if type(kv_heads) is not int or kv_heads <= 0 or heads % kv_heads:
        raise SurgeryError(f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    head_dim = config.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise SurgeryError(f"{where}: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) and no head_dim is given")
        head_dim = hidden // heads
    dims = {"hidden": hidden, "vocab": need("vocab_size"), "layers": need("num_hidden_layers"),
            "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "q_dim": heads * head_dim, "kv_dim": kv_heads * head_dim, "1": 1}
    if config.get("intermediate_size") is not None:
        dims["ffn"] = need("intermediate_size")
    for dimension in ("experts", "top_k", "expert_ffn", "shared_ffn"):
        value = _moe_value(family, config, dimension)
        if value is not None:
            dims[dimension] = value
    return dims


def shape_of(spec: Spec, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(math.prod(int(part) if part.isdigit() else dims[part] for part in term.split("*")) for term in spec.shape)


def _applies(spec: Spec, family: Family, config: dict) -> bool:
    if spec.when is None:
        return True
    negate = spec.when.startswith("not ")
    value = bool(config_value(family, config, spec.when.removeprefix("not ")))
    return value != negate


def is_moe_layer(family: Family, config: dict, layer: int) -> bool:
    if family.kind != "moe":
        return False
    if family.sparse_layers == "all":
        return True
    step = config_value(family, config, "decoder_sparse_step") or 1
    experts = _moe_value(family, config, "experts") or 0
    return layer not in (config_value(family, config, "mlp_only_layers") or []) and experts > 0 and (layer + 1) % step == 0


@dataclass(frozen=True)
class Expected:
    """One tensor the table expects: its name, shape and where it belongs."""

    name: str
    shape: tuple[int, ...]
    group: str
    role: str
    layer: int | None = None
    expert: int | None = None


def expected_tensors(family: Family, config: dict, expert_layout: str = "per_expert",
                     where: Path | str = "config.json") -> dict[str, Expected]:
    """Every tensor a checkpoint of this family and config must hold, in model order."""
    dims = dimensions(family, config, where)
    out: dict[str, Expected] = {}

    def add(spec: Spec, layer=None, expert=None):
        if _applies(spec, family, config):
            name = spec.name(layer, expert)
            out[name] = Expected(name, shape_of(spec, dims), spec.group, spec.role, layer, expert)

    add(GLOBAL[0])
    for layer in range(dims["layers"]):
        for spec in family.attention:
            add(spec, layer)
        if is_moe_layer(family, config, layer):
            add(family.fused_router or family.router if expert_layout == "fused" else family.router, layer)
            if expert_layout == "fused":
                for spec in family.fused_experts:
                    add(spec, layer)
            else:
                for expert in range(dims["experts"]):
                    for spec in family.experts:
                        add(spec, layer, expert)
            if family.shared_expert and dims.get("shared_ffn"):
                for spec in family.shared_expert:
                    add(spec, layer)
        else:
            for spec in family.dense_ffn:
                add(spec, layer)
    for spec in GLOBAL[1:]:
        add(spec)
    return out


def detect_expert_layout(family: Family, names) -> str:
    """'fused' when the checkpoint stores transformers-5 fused experts, else 'per_expert'."""
    fused = {spec.template.split("{layer}.")[-1] for spec in family.fused_experts}
    return "fused" if any(name.split(".", 3)[-1] in fused for name in names) else "per_expert"


# ------------------------------------------------------------------- config translation
# Keys never carried from a dense source into an MoE config: identity and bookkeeping.
DROPPED_KEYS = ("architectures", "model_type", "auto_map", "_name_or_path", "transformers_version",
                "pretraining_tp", "mlp_bias")


@dataclass(frozen=True)
class Conversion:
    """How a dense family becomes an MoE family: what is refused and which keys are set."""

    refuse_if: tuple[str, ...] = ()  # config keys that must be false in the source
    set_keys: dict = field(default_factory=dict)  # fixed values written into the target config
    copy_keys: dict = field(default_factory=dict)  # target key <- source key (after defaults)


CONVERSIONS: dict[tuple[str, str], Conversion] = {
    ("llama", "mixtral"): Conversion(refuse_if=("attention_bias", "mlp_bias"), set_keys={"sliding_window": None}),
    ("mistral", "mixtral"): Conversion(),
    ("llama", "qwen2_moe"): Conversion(refuse_if=("attention_bias", "mlp_bias"),
                                      set_keys={"qkv_bias": False, "use_sliding_window": False, "sliding_window": None}),
    ("qwen2", "qwen2_moe"): Conversion(copy_keys={"qkv_bias": "qkv_bias"}),
    ("qwen3", "qwen3_moe"): Conversion(refuse_if=("mlp_bias",)),
}
DEFAULT_TARGET = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
TARGET_SETTINGS = {
    "mixtral": {"router_aux_loss_coef": 0.001, "output_router_logits": False, "router_jitter_noise": 0.0},
    "qwen2_moe": {"norm_topk_prob": True, "router_aux_loss_coef": 0.001, "output_router_logits": False},
    "qwen3_moe": {"norm_topk_prob": True, "router_aux_loss_coef": 0.001, "output_router_logits": False},
}


def moe_target(source: Family, target: str, source_config: dict, where: Path | str = "config.json") -> Family:
    """The target family for `--format` (``auto`` picks the natural one), refusing what cannot be exact."""
    name = DEFAULT_TARGET.get(source.name) if target == "auto" else target
    if name not in FAMILIES or FAMILIES[name].kind != "moe":
        raise SurgeryError(f"format {target!r} is not an MoE format (expected auto, {', '.join(TARGET_SETTINGS)})")
    conversion = CONVERSIONS.get((source.name, name))
    if source.kind != "dense" or conversion is None:
        allowed = sorted({t for (s, t) in CONVERSIONS if s == source.name})
        raise SurgeryError(f"{where}: a {source.name} model cannot become {name} "
                           f"(formats for {source.name}: {', '.join(allowed) or 'none'})")
    for key in conversion.refuse_if:
        if config_value(source, source_config, key):
            raise SurgeryError(f"{where}: {key} is true, but {name} has no such weights, so the result could not "
                               f"reproduce the source; choose another --format")
    return FAMILIES[name]


def moe_config(source: Family, source_config: dict, target: Family, *, num_experts: int, top_k: int,
               expert_ffn: int, shared_ffn: int | None = None, dense_layers: list[int] | None = None) -> dict:
    """config.json for the MoE result: the source's keys verbatim, plus the target's MoE keys."""
    conversion = CONVERSIONS[(source.name, target.name)]
    config = {key: value for key, value in source_config.items() if key not in DROPPED_KEYS}
    config["architectures"] = [target.architecture]
    config["model_type"] = target.name
    config.update(TARGET_SETTINGS[target.name])
    config.update(conversion.set_keys)
    for target_key, source_key in conversion.copy_keys.items():
        config[target_key] = config_value(source, source_config, source_key)
    if "tie_word_embeddings" not in config:
        config["tie_word_embeddings"] = config_value(source, source_config, "tie_word_embeddings")
    keys = target.moe_keys
    config[keys["experts"][0]] = num_experts
    config[keys["top_k"][0]] = top_k
    if target.name == "mixtral":
        config["intermediate_size"] = expert_ffn
    else:
        config[keys["expert_ffn"][0]] = expert_ffn
        config["decoder_sparse_step"] = 1
        config["mlp_only_layers"] = sorted(dense_layers or [])
    if "shared_ffn" in keys:
        config[keys["shared_ffn"][0]] = shared_ffn or 0
    elif shared_ffn:
        raise SurgeryError(f"format {target.name} has no shared expert (use --format qwen2_moe)")
    if dense_layers and target.sparse_layers == "all":
        raise SurgeryError(f"format {target.name} makes every layer MoE; --moe-layers must be 'all' "
                           f"(use qwen2_moe or qwen3_moe for dense layers)")
    return config
