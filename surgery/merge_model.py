"""The merge model: the models of a ``surgery merge`` opened, checked against each other and settled.

``open_merge`` turns a ``MergeSpec`` into a ``Merge``: every member opened, incompatible ones refused, the
experts in order, the averaging weights, the reference model (config, tokenizer, side files), the target
MoE format, its config and the output dtype. ``resolve_router_init`` settles ``--router-init auto`` and
``reference_tokenizer`` loads the tokenizer that calibration text is read with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from surgery import families as arch
from surgery.compat import Member, check_compatible
from surgery.errors import SurgeryError
from surgery.merge_config import SEED_NAME, MergeSpec
from surgery.moe_plan import inert_shared_ffn, inert_shared_note


@dataclass
class Merge:
    """A merge with its inputs opened and checked: what build_plan needs."""

    spec: MergeSpec
    members: list[Member]  # every model: experts in order, then the seed
    experts: list[Member]  # the MoE's experts in order (the seed last with --include-seed)
    weights: dict[str, float]  # averaging weight of each member (0 = not averaged)
    reference: Member  # config, tokenizer and side files come from it: the seed, else the first expert
    target: arch.Family
    config: dict
    dtype: str  # safetensors dtype of every output tensor
    notes: list[str] = field(default_factory=list)

    @property
    def source_family(self) -> arch.Family:
        return self.reference.family

    def member(self, name: str) -> Member:
        return next(member for member in self.members if member.name == name)

    def domains(self):
        """(expert index, name, text) of every expert that has calibration text."""
        from surgery.btx_router import Domain

        return [Domain(index, member.name, self.spec.calibration[member.name].text)
                for index, member in enumerate(self.experts) if member.name in self.spec.calibration]


def open_merge(spec: MergeSpec) -> Merge:
    """Open every model, refuse incompatible ones, and settle the target format and config."""
    from surgery.checkpoint import parse_dtype, set_config_dtype
    from surgery.moe_plan import open_dense_source

    members = []
    for name, path in spec.experts + ([(SEED_NAME, spec.seed)] if spec.seed else []):
        checkpoint, family = open_dense_source(path)
        checkpoint.label = name
        members.append(Member(name, checkpoint, family))
    notes = list(spec.notes) + check_compatible(members)
    by_name = {member.name: member for member in members}
    experts = [by_name[name] for name, _ in spec.experts] + ([by_name[SEED_NAME]] if spec.include_seed else [])
    if len(experts) < 2:
        raise SurgeryError(f"a merge needs at least 2 experts, found {len(experts)} (add --expert or --include-seed)")
    weights = {member.name: float(spec.weights.get(member.name, 1.0)) for member in members}
    reference = by_name[SEED_NAME] if spec.seed else members[0]
    family = reference.family
    where = reference.checkpoint.directory / "config.json"
    target = arch.moe_target(family, spec.format, reference.checkpoint.config, where)
    dims = arch.dimensions(family, reference.checkpoint.config, where)
    config = arch.moe_config(family, reference.checkpoint.config, target, num_experts=len(experts), top_k=spec.top_k,
                             expert_ffn=dims["ffn"], shared_ffn=inert_shared_ffn(target),
                             where=where)
    if inert_shared_ffn(target):
        notes.append(inert_shared_note(target))
    embed = family.spec("embedding", "embed").name()
    dtype = parse_dtype(spec.dtype) if spec.dtype not in (None, "keep") else reference.checkpoint.info(embed).dtype
    if dtype in ("F32", "BF16", "F16"):
        set_config_dtype(config, dtype)
    else:
        config.pop("torch_dtype", None)
    if spec.router_init in ("embedding", "calibrated"):
        missing = [m.name for m in experts if m.name not in spec.calibration and m.name != SEED_NAME]
        if missing:
            raise SurgeryError(f"--router-init {spec.router_init} needs calibration text for every expert; "
                               f"missing for {', '.join(missing)} (give --calibration {missing[0]}=FILE)")
    return Merge(spec, members, experts, weights, reference, target, config, dtype, notes)


def resolve_router_init(spec: MergeSpec) -> str:
    """`auto`: calibrated when every domain expert has calibration text, else normal (a zero router would
    tie every logit: every token would use the first top-k experts, or whichever an engine's tie-break picks)."""
    if spec.router_init != "auto":
        return spec.router_init
    names = [name for name, _ in spec.experts]
    return "calibrated" if names and all(name in spec.calibration for name in names) else "normal"


def reference_tokenizer(merge: Merge):
    from surgery.loading import load_tokenizer

    tokenizer = load_tokenizer(merge.reference.checkpoint.directory)
    if tokenizer is None:
        raise SurgeryError(f"{merge.reference.checkpoint.directory}: no tokenizer files; --router-init "
                           f"{merge.spec.router_init} tokenizes the calibration text with the model's tokenizer")
    return tokenizer
