"""What a family is made of, the row groups families share, and the shape logic every family uses.

A family lists its tensors as ``Spec`` rows: a role (``q``, ``gate``, ``router`` ...), the group it
belongs to (attention, ffn, experts ...), a name template with ``{layer}`` / ``{expert}``
placeholders, a shape written in named dimensions (derived from config.json by ``dimensions``) and
an optional condition on a config key. Operations ask for names and shapes; they never spell tensor
names. The row groups below (``GLOBAL``, ``QKVO``, ``NORMS``, ``DENSE_FFN``, ``FUSED_EXPERTS`` ...)
are the rows several families share; a family module combines them with its own rows.

Nothing here names a family: what differs between families is data on their ``Family``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.families.dense_form import AllDense
from surgery.families.moe_layers import every_layer, router_specs
from surgery.families.sliding import SlidingWindow


@dataclass(frozen=True)
class Spec:
    role: str
    group: str
    template: str
    shape: tuple[str, ...]
    when: str | None = None  # config key that must be truthy; "not KEY" for falsy; several joined by " and "
    layer_type: str | None = None  # only in layers of this type (the family's ``layer_type``: ``layer_types[l]``)

    def name(self, layer: int | None = None, expert: int | None = None) -> str:
        return self.template.format(layer=layer, expert=expert)


def specs(group: str, prefix: str, rows) -> tuple[Spec, ...]:
    """``Spec`` rows of one group from (role, name suffix, shape[, when]) tuples."""
    return tuple(Spec(role, group, prefix + suffix, shape, *rest) for role, suffix, shape, *rest in rows)


L = "model.layers.{layer}."

# ------------------------------------------------------------------- rows families share
GLOBAL = specs("embedding", "", [("embed", "model.embed_tokens.weight", ("vocab", "hidden"))]) + (
    Spec("final_norm", "norm", "model.norm.weight", ("hidden",)),
    Spec("lm_head", "head", "lm_head.weight", ("vocab", "hidden"), "not tie_word_embeddings"),
)
QKVO = [
    ("q", "self_attn.q_proj.weight", ("q_dim", "hidden")),
    ("k", "self_attn.k_proj.weight", ("kv_dim", "hidden")),
    ("v", "self_attn.v_proj.weight", ("kv_dim", "hidden")),
    ("o", "self_attn.o_proj.weight", ("hidden", "q_dim")),
]
NORMS = specs("norm", L, [
    ("input_norm", "input_layernorm.weight", ("hidden",)),
    ("post_attention_norm", "post_attention_layernorm.weight", ("hidden",)),
])


def qkv_bias(key: str) -> list:
    """q/k/v bias rows, present when config key `key` is true."""
    return [("q_bias", "self_attn.q_proj.bias", ("q_dim",), key),
            ("k_bias", "self_attn.k_proj.bias", ("kv_dim",), key),
            ("v_bias", "self_attn.v_proj.bias", ("kv_dim",), key)]


O_BIAS = [("o_bias", "self_attn.o_proj.bias", ("hidden",), "attention_bias")]
QK_NORM = [("q_norm", "self_attn.q_norm.weight", ("head_dim",)), ("k_norm", "self_attn.k_norm.weight", ("head_dim",))]

DENSE_FFN = specs("ffn", L, [
    ("gate", "mlp.gate_proj.weight", ("ffn", "hidden")),
    ("up", "mlp.up_proj.weight", ("ffn", "hidden")),
    ("down", "mlp.down_proj.weight", ("hidden", "ffn")),
    ("gate_bias", "mlp.gate_proj.bias", ("ffn",), "mlp_bias"),
    ("up_bias", "mlp.up_proj.bias", ("ffn",), "mlp_bias"),
    ("down_bias", "mlp.down_proj.bias", ("hidden",), "mlp_bias"),
])


def per_expert(prefix: str, gate: str, up: str, down: str) -> tuple[Spec, ...]:
    """The per-expert layout: `prefix` + experts.{expert}. + the gate/up/down module names."""
    return specs("experts", L + prefix + "experts.{expert}.", [
        ("gate", gate + ".weight", ("expert_ffn", "hidden")),
        ("up", up + ".weight", ("expert_ffn", "hidden")),
        ("down", down + ".weight", ("hidden", "expert_ffn")),
    ])


# transformers 5 keeps experts fused in memory and may save them that way: the fused layout is also
# the in-memory layout that layer-by-layer execution builds. FUSED_PARTS: which per-expert roles a
# fused role stacks, in order along its second dimension (gate rows first, then up).
FUSED_PARTS = {"gate_up": ("gate", "up"), "down": ("down",)}
FUSED_EXPERTS = specs("experts", L, [
    ("gate_up", "mlp.experts.gate_up_proj", ("experts", "2*expert_ffn", "hidden")),
    ("down", "mlp.experts.down_proj", ("experts", "hidden", "expert_ffn")),
])

BASE_DEFAULTS = {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}
QWEN_SPARSE_DEFAULTS = {"decoder_sparse_step": 1, "mlp_only_layers": []}


# ------------------------------------------------------------------- the family record
@dataclass(frozen=True)
class Conversion:
    """How a dense family becomes an MoE family: what is refused and which keys are set."""

    refuse_if: tuple[str, ...] = ()  # config keys that must be false in the source
    set_keys: dict = field(default_factory=dict)  # fixed values written into the target config
    copy_keys: dict = field(default_factory=dict)  # target key <- source key (after defaults)
    # config key (a.b for a nested key) -> (the value the target can reproduce, why): refused otherwise
    require: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FusedSource:
    """One stored tensor holding several roles back to back along its first dimension (Phi-3's
    ``qkv_proj``: the q rows, then k, then v). The roles stay ordinary specs of the family (their
    names are what operations ask for); the checkpoint exposes each as a view of the stored tensor
    (a contiguous byte range), and structure checks expect the stored tensor instead."""

    group: str  # the roles' group (attention, ffn)
    template: str  # the stored tensor's name
    roles: tuple[str, ...]  # in storage order


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
    # dimension -> config key(s), first present wins; an MoE result's config gets the first key of each
    moe_keys: dict = field(default_factory=dict)
    sparse_layers: Callable = every_layer  # which layers hold experts: every_layer, qwen_layers, ...
    # The router of an MoE layer reads the input of the module holding the layer's FFN or MoE block
    # (transformers' `mlp`: the post-attention norm output in pre-norm families); calibration
    # captures that input, for dense sources too, where a future router will read it.
    router_input: str = "mlp"
    # what the router module returns, in order (``moe_layers.routing_of`` reads it): transformers 5's
    # (logits, weights, chosen experts), or Llama 4's (scores, logits)
    router_outputs: tuple[str, ...] = ("logits", "weights", "indices")
    # how transformers' experts module is called: "routed" (transformers 5: each token's rows with the chosen experts
    # and their weights), "routed_rows" (gpt-oss: the same, with no "no expert" index), or "scaled" (Llama 4: every
    # expert's copy of every token back to back, each scaled by its router score, so the tokens at weight 1 are the
    # MoE block's input)
    experts_call: str = "routed"
    # fused expert weights stored input-major, [E, in, out], multiplied as x @ W (gpt-oss, Llama 4): on a CPU in bf16 or
    # fp16, PyTorch's matmul of that memory order is ~55x slower than of [E, out, in] (2-core AVX2 machine, measured),
    # so the runner holds them in that order (a transposed view of the same values)
    experts_input_major: bool = False
    # transformers' attention module of a decoder layer: its output (first element) is what a stopped pass
    # keeps so the layer's full run can reuse it instead of computing attention again
    attention_module: str = "self_attn"
    # hybrid families: a layer type -> its token mixer where that is not ``attention_module`` (Qwen3-Next's gated
    # DeltaNet ``linear_attn``, which returns its output alone, not in a tuple); ``attention_module_of`` reads it
    attention_modules: dict = field(default_factory=dict)
    # dense families: the MoE formats this family can become (target name -> Conversion), and the
    # one `--format auto` picks
    conversions: dict = field(default_factory=dict)
    default_target: str | None = None
    # MoE families: config values an MoE result of this format gets (router settings)
    target_settings: dict = field(default_factory=dict)
    # MoE families: mergekit-moe's name of this output architecture, lower case (its `architecture:` key
    # selects the architectures whose name begins with what it says)
    mergekit_names: tuple[str, ...] = ()
    # roles stored fused in one tensor (checkpoints and transformers' module alike)
    fused_sources: tuple[FusedSource, ...] = ()
    # MoE families with a shared expert: the share of its output the model adds when its gate weights are
    # zero (Qwen2-MoE: sigmoid(0) = 0.5) or always (no gate: 1.0), and whether the format always has one
    shared_scale: float = 0.5
    shared_required: bool = True
    # modules beside ``router_input`` whose outputs the decoder layer adds to it (GraniteMoeShared's
    # ``shared_mlp``): the layer's FFN part, as a layer-by-layer comparison measures it
    extra_ffn_modules: tuple[str, ...] = ()
    # MoE families: the layouts its checkpoints may store experts in ("per_expert", "fused"); a family
    # that stores them fused only (GraniteMoE) still names per-expert roles, which plans are built from
    stored_layouts: tuple[str, ...] = ("per_expert", "fused")
    # layer-relative stored name -> transformers' in-memory name, where they differ (GraniteMoE keeps its
    # original ``input_linear`` names on disk; its module holds ``experts.gate_up_proj``)
    memory_names: dict = field(default_factory=dict)
    # per-expert router tensors beside the router's weight (a router bias, a score-correction bias), sliced with
    # the experts along the axis their shape names ``experts``; ``fused_router_tensors``: the same roles' names in
    # the fused layout, where they differ
    router_tensors: tuple[Spec, ...] = ()
    fused_router_tensors: tuple[Spec, ...] = ()
    # which per-expert roles each fused expert tensor stacks, in order along its second dimension
    fused_parts: dict = field(default_factory=lambda: dict(FUSED_PARTS))
    # model-level tensors beside the embedding, final norm and head (a final norm's bias)
    global_tensors: tuple[Spec, ...] = ()
    # derived sizes the shape column uses beyond ``dimensions``' own (MLA's ranks, a shared expert's width ...):
    # config (with defaults applied) -> {dimension: size}
    derived_dims: Callable | None = None
    # a layer's type, for ``Spec.layer_type`` (hybrid families: ``layer_types[l]``)
    layer_type: Callable | None = None
    # group-limited routing (DeepSeek-V3): the config keys of the group count and of the groups each token
    # may use, and the fewest experts a group must keep (its score sums its top-2)
    router_scoring: str = "softmax"  # how the router scores experts: "softmax", or "sigmoid" (DeepSeek-V3)
    group_keys: tuple[str, str] | None = None
    group_when: tuple[str, object] | None = None  # (config key, value) that switches group-limited routing on
    group_min_experts: int = 1
    # multi-token-prediction weights stored beside the model that transformers does not load: config ->
    # stored-name prefixes, and the config values that say the model has none (set when they are dropped)
    mtp_prefixes: Callable | None = None
    mtp_off: dict = field(default_factory=dict)
    # MoE families: the config key that switches renormalising the top-k softmax weights to sum to 1 (off where
    # absent, as in transformers' configs); None: the router always renormalises them (Mixtral, GraniteMoE)
    top_k_norm: str | None = None
    top_k_renormalised: bool = True  # without a switch: whether the router renormalises (DeepSeek-V2: never)
    # MoE families: what `surgery extract` writes (families/dense_form.py): None, the dense family that converts into
    # this one; an AllDense, this family with every layer dense; a string, why it has no dense form (the refusal)
    dense_form: AllDense | str | None = None

    def attention_module_of(self, config: dict, layer: int) -> str:
        """transformers' attention (token-mixing) module of decoder layer `layer`, by its layer type."""
        kind = self.layer_type(config, layer) if self.layer_type is not None else None
        return self.attention_modules.get(kind, self.attention_module)

    def memory_name(self, relative: str) -> str:
        """transformers' in-memory name of a stored tensor, relative to its decoder layer."""
        return self.memory_names.get(relative, relative)

    # how its config says which layers attend through a sliding window; None: no layer ever does
    sliding: SlidingWindow | None = None

    def spec(self, group: str, role: str) -> Spec:
        pool = {"ffn": self.dense_ffn, "experts": self.experts, "shared_expert": self.shared_expert,
                "fused_experts": self.fused_experts,
                "router": ((self.router,) if self.router else ()) + self.router_tensors}.get(group)
        pool = pool if pool is not None else GLOBAL + self.global_tensors + self.attention
        for spec in pool:
            if spec.role == role:
                return spec
        raise KeyError(f"{self.name} has no tensor role {group}/{role}")


# ------------------------------------------------------------------- names and shapes
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
    if family.derived_dims is not None:
        dims.update(family.derived_dims({**family.defaults, **{k: v for k, v in config.items() if v is not None}}))
    return dims


def shape_of(spec: Spec, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(math.prod(int(part) if part.isdigit() else dims[part] for part in term.split("*")) for term in spec.shape)


def _applies(spec: Spec, family: Family, config: dict, layer: int | None = None) -> bool:
    """Whether `spec` exists for this config (and layer): its layer type, and its ``when`` (``KEY``, ``not KEY``, or
    several joined by `` and ``)."""
    if spec.layer_type is not None and family.layer_type(config, layer) != spec.layer_type:
        return False
    for condition in (spec.when or "").split(" and ") if spec.when else ():
        negate = condition.startswith("not ")
        if bool(config_value(family, config, condition.removeprefix("not "))) == negate:
            return False
    return True


def moe_layers(family: Family, config: dict) -> list[int]:
    """The MoE layers of a model of `family` with `config` (none for a dense family)."""
    return [layer for layer in range(dimensions(family, config)["layers"]) if is_moe_layer(family, config, layer)]


def is_moe_layer(family: Family, config: dict, layer: int) -> bool:
    if family.kind != "moe" or not (_moe_value(family, config, "experts") or 0):
        return False
    return family.sparse_layers(lambda key: config_value(family, config, key), layer)


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

    fused_by_role = {(fused.group, role): fused for fused in family.fused_sources for role in fused.roles}

    def add(spec: Spec, layer=None, expert=None):
        if not _applies(spec, family, config, layer):
            return
        fused = fused_by_role.get((spec.group, spec.role))
        if fused is None:
            name = spec.name(layer, expert)
            out[name] = Expected(name, shape_of(spec, dims), spec.group, spec.role, layer, expert)
        elif spec.role == fused.roles[0]:  # the stored tensor, where its first role would be
            parts = [shape_of(family.spec(fused.group, role), dims) for role in fused.roles]
            name = fused.template.format(layer=layer)
            shape = (sum(part[0] for part in parts),) + parts[0][1:]
            out[name] = Expected(name, shape, spec.group, "+".join(fused.roles), layer, expert)

    add(GLOBAL[0])
    for layer in range(dims["layers"]):
        for spec in family.attention:
            add(spec, layer)
        if is_moe_layer(family, config, layer):
            for spec in router_specs(family, expert_layout):
                add(spec, layer)
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
    for spec in GLOBAL[1:2] + family.global_tensors + GLOBAL[2:]:
        add(spec)
    return out


def source_views(family: Family, config: dict, where: Path | str = "config.json") -> dict[str, tuple[str, int, int]]:
    """Every role stored inside a fused tensor: its own name -> (stored name, first row, end row)."""
    dims = dimensions(family, config, where)
    views = {}
    for layer in range(dims["layers"]):
        for fused in family.fused_sources:
            row = 0
            for role in fused.roles:
                spec = family.spec(fused.group, role)
                rows = shape_of(spec, dims)[0]
                views[spec.name(layer)] = (fused.template.format(layer=layer), row, row + rows)
                row += rows
    return views

def detect_expert_layout(family: Family, names) -> str:
    """'fused' when the checkpoint stores transformers-5 fused experts, else 'per_expert'."""
    fused = {spec.template.split("{layer}.")[-1] for spec in family.fused_experts}
    return "fused" if any(name.split(".", 3)[-1] in fused for name in names) else "per_expert"
