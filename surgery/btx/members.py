"""The merge model: the models of a ``surgery merge`` opened, checked against each other and settled.

``open_merge`` turns a ``MergeSpec`` into a ``Merge``: every member opened, incompatible ones refused, the
experts in order, the shared expert's model, the averaging weights (a directory given twice enters the
average once), the reference model (config, tokenizer, side files), the target MoE format, its config
and the output dtype. ``resolve_router_init`` settles ``--router-init auto`` and ``reference_tokenizer``
loads the tokenizer that calibration text is read with.

The shared expert (``shared_experts`` of a mergekit-moe config) is one model's dense FFN, written as the
shared expert of a format that has one, its ``residual_scale`` folded into its ``down_proj``. Its sigmoid
gate is fitted on its calibration text against the routed experts' text when routers are calibrated,
and is otherwise the constant 1/2 (row 0: a bias-free sigmoid gate is constant only there), in which
case ``down_proj`` also carries a factor 2 (a power of two: exact) so that the shared expert adds exactly
``residual_scale`` times its FFN output to every token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from surgery import families as arch
from surgery.btx.compatibility import Member, check_compatible, tokenizer_fingerprint
from surgery.btx.mergekit import mergekit_notes
from surgery.btx.spec import SEED_NAME, DomainText, MergeSpec
from surgery.errors import SurgeryError
from surgery.execution.loading import load_tokenizer
from surgery.io.dtypes import parse_dtype, set_config_dtype
from surgery.plan.moe import inert_shared_ffn, inert_shared_note
from surgery.plan.sources import open_dense_source

CONSTANT_GATE = 0.5  # sigmoid(0): the shared gate with a zero row


@dataclass
class Domain:
    """Calibration data of one expert (or of the shared expert, or text an expert should not take)."""

    expert: int  # index of the expert its tokens should go to
    name: str
    data: DomainText


@dataclass
class Merge:
    """A merge with its inputs opened and checked: what build_plan needs."""

    spec: MergeSpec
    members: list[Member]  # every model: experts in order, then the seed, then the shared expert's model
    experts: list[Member]  # the MoE's experts in order (the seed last with --include-seed)
    weights: dict[str, float]  # averaging weight of each member (0 = not averaged)
    reference: Member  # config, tokenizer and side files come from it: the seed, else the first expert
    target: arch.Family
    config: dict
    dtype: str  # safetensors dtype of every output tensor
    notes: list[str] = field(default_factory=list)
    shared: Member | None = None  # the model whose FFN is the shared expert
    shared_gate: str = "inert"  # "fitted" (calibrated on its text), "constant" (row 0) or "inert" (no shared expert)

    @property
    def source_family(self) -> arch.Family:
        return self.reference.family

    def member(self, name: str) -> Member:
        return next(member for member in self.members if member.name == name)

    def down_factor(self, member: Member) -> float:
        """The factor on a member's down_proj where it is an expert (its residual_scale; x2 behind a constant gate)."""
        factor = self.spec.residual_scale.get(member.name, 1.0)
        return factor / CONSTANT_GATE if member is self.shared and self.shared_gate == "constant" else factor

    def domains(self) -> list[Domain]:
        """Every expert that has calibration text (or token ids), in expert order."""
        return [Domain(index, member.name, self.spec.calibration[member.name])
                for index, member in enumerate(self.experts) if member.name in self.spec.calibration]

    def negative_domains(self) -> list[Domain]:
        """Every expert's negative text (text its router row should not prefer)."""
        return [Domain(index, member.name, self.spec.negative[member.name])
                for index, member in enumerate(self.experts) if member.name in self.spec.negative]


def open_merge(spec: MergeSpec) -> Merge:
    """Open every model, refuse incompatible ones, and settle the target format and config."""
    where = spec.origin.path if spec.origin else "options"
    members = []
    for name, path in spec.paths():
        checkpoint, family = open_dense_source(path)
        checkpoint.label = name
        members.append(Member(name, checkpoint, family))
    notes = list(spec.notes) + check_compatible(members)
    by_name = {member.name: member for member in members}
    experts = [by_name[name] for name, _ in spec.experts] + ([by_name[SEED_NAME]] if spec.include_seed else [])
    if len(experts) < 2:
        raise SurgeryError(f"a merge needs at least 2 experts, found {len(experts)} (add --expert or --include-seed)")
    weights = {member.name: float(spec.weights.get(member.name, 1.0)) for member in members}
    notes += average_once(members, spec, weights)
    reference = by_name[SEED_NAME] if spec.seed else members[0]
    shared = by_name[spec.shared[0]] if spec.shared else None
    family = reference.family
    config_path = reference.checkpoint.directory / "config.json"
    target = arch.moe_target(family, target_format(spec, family, where), reference.checkpoint.config, config_path)
    dims = arch.dimensions(family, reference.checkpoint.config, config_path)
    shared_ffn = dims["ffn"] if shared and target.shared_expert else inert_shared_ffn(target)
    config = arch.moe_config(family, reference.checkpoint.config, target, num_experts=len(experts), top_k=spec.top_k,
                             expert_ffn=dims["ffn"], shared_ffn=shared_ffn, where=config_path)
    embed = family.spec("embedding", "embed").name()
    dtype = parse_dtype(spec.dtype) if spec.dtype not in (None, "keep") else reference.checkpoint.info(embed).dtype
    if dtype in ("F32", "BF16", "F16"):
        set_config_dtype(config, dtype)
    else:
        config.pop("torch_dtype", None)
    if spec.router_init in ("embedding", "calibrated"):
        missing = [m.name for m in experts if m.name not in spec.calibration and m.name != SEED_NAME]
        if missing and spec.origin and spec.router_init == spec.origin.router_init:
            raise SurgeryError(f"{where}: gate_mode {spec.origin.gate_mode} needs positive_prompts for every expert; "
                               f"missing for {', '.join(missing)} (give {spec.origin.places[missing[0]]}.positive_prompts)")
        if missing:
            raise SurgeryError(f"--router-init {spec.router_init} needs calibration text for every expert; "
                               f"missing for {', '.join(missing)} (give --calibration {missing[0]}=FILE)")
    merge = Merge(spec, members, experts, weights, reference, target, config, dtype, notes, shared)
    if spec.origin:
        notes += mergekit_notes(spec, target.name, [m.name for m in members if weights[m.name] != 0])
    notes += tokenizer_notes(spec, members, reference, where)
    if shared:
        merge.shared_gate = shared_gate(spec, shared, where)
        notes.append(shared_note(merge))
    elif inert_shared_ffn(target):
        notes.append(inert_shared_note(target))
    return merge


def target_format(spec: MergeSpec, family: arch.Family, where) -> str:
    """The format to write: --format, or among a mergekit architecture's formats the one these inputs can become;
    with a shared expert, a format that has one."""
    if spec.format != "auto":
        choices = (spec.format,)
    elif spec.format_choices:
        choices = spec.format_choices
    elif spec.shared:
        choices = (family.default_target, *sorted(family.conversions))
    else:
        return "auto"
    usable = [name for name in dict.fromkeys(choices) if name in family.conversions]
    if spec.shared:
        with_shared = [name for name in usable if arch.FAMILIES[name].shared_expert]
        if not with_shared:
            found = [name for name in family.conversions if arch.FAMILIES[name].shared_expert]
            why = (f"{' / '.join(choices)} has none (a {family.name} model can become {' or '.join(found)})" if found
                   else f"a {family.name} model can become only {', '.join(sorted(family.conversions))}")
            raise SurgeryError(f"{where}: shared_experts needs a format with a shared expert, but {why}")
        usable = with_shared
    if spec.format_choices and spec.format == "auto" and not usable:
        raise SurgeryError(f"{where}: architecture names {', '.join(spec.format_choices)}, but a {family.name} model "
                           f"can become {', '.join(sorted(family.conversions)) or 'no MoE format'}")
    return usable[0] if usable else spec.format


def average_once(members: list[Member], spec: MergeSpec, weights: dict[str, float]) -> list[str]:
    """A directory given as several models (base_model again as an expert, one model as two experts) enters the
    non-FFN average once: under its first name (the seed first, then the experts in order); its other names
    get weight 0 there. A --weights entry for one of those other names is refused."""
    groups: dict[Path, list[Member]] = {}
    for member in sorted(members, key=lambda m: m.name != SEED_NAME):
        groups.setdefault(member.checkpoint.directory.resolve(), []).append(member)
    notes = []
    for directory, group in groups.items():
        first = group[0]
        for member in group[1:]:
            if spec.weights.get(member.name, 0) != 0:
                raise SurgeryError(f"--weights names {member.name}, the same directory as {first.name} ({directory}), "
                                   f"which enters the average once, as {first.name}; give the weight to {first.name}")
            weights[member.name] = 0.0
        if len(group) > 1 and spec.non_ffn == "average":
            notes.append(f"{directory} is given as {', '.join(m.name for m in group)}: it enters the non-FFN average "
                         f"once, as {first.name}")
    return notes


def tokenizer_notes(spec: MergeSpec, members: list[Member], reference: Member, where) -> list[str]:
    """tokenizer_source is honoured where it names the tokenizer every model shares, refused where it does not."""
    source = spec.tokenizer_source
    if source is None:
        return []
    shared = "the models share one tokenizer (compared by content)"
    ours = tokenizer_fingerprint(reference.checkpoint.directory)
    if source in ("base", "union") and not ours:
        return [f"tokenizer_source {source}: the models ship no tokenizer files, so the output has none"]
    if source in ("base", "union"):
        what = "base_model's" if source == "base" else "the union of their vocabularies"
        return [f"tokenizer_source {source}: {shared}, so {what} is that tokenizer; copied from {reference.name}"]
    theirs = tokenizer_fingerprint(Path(source))
    if not theirs or not ours:
        missing = "there" if not theirs else f"in the models to compare it with ({reference.checkpoint.directory})"
        raise SurgeryError(f"{where}: tokenizer_source {source}: no tokenizer files {missing}")
    if theirs != ours:
        differs = sorted(name for name in set(theirs) | set(ours) if theirs.get(name) != ours.get(name))
        raise SurgeryError(f"{where}: tokenizer_source {source}: its {differs[0]} differs from {reference.name}'s "
                           "(compared by content); surgery merge keeps the vocabulary the models share and does not "
                           "re-map embeddings to another tokenizer")
    return [f"tokenizer_source {source}: the same tokenizer as the models' (compared by content); copied from "
            f"{reference.name}"]


def shared_gate(spec: MergeSpec, shared: Member, where) -> str:
    """"fitted" when routers are calibrated and the shared expert has text, else "constant"."""
    place = spec.origin.places[shared.name] if spec.origin else shared.name
    if shared.name in spec.negative and shared.name not in spec.calibration:
        raise SurgeryError(f"{where}: {place}.negative_prompts: the shared expert's gate is fitted on its "
                           "positive_prompts against other text; give positive_prompts too, or no prompts")
    if shared.name in spec.calibration and spec.router_init == "calibrated":
        return "fitted"
    if shared.name in spec.calibration and spec.router_init == "embedding":
        raise SurgeryError(f"{where}: {place}.positive_prompts: the shared expert's gate is fitted on text only "
                           "with calibrated routers (gate_mode hidden); remove its prompts for a constant gate")
    return "constant"


def shared_note(merge: Merge) -> str:
    shared, spec = merge.shared, merge.spec
    scale = spec.residual_scale.get(shared.name, 1.0)
    text = f"shared expert: the FFN of {shared.name} ({shared.checkpoint.directory}), on every token; "
    if merge.shared_gate == "fitted":
        return text + (f"its sigmoid gate is fitted layer by layer ({spec.router_fit}) to open on its text "
                       f"({spec.calibration[shared.name].source}) and close on the routed experts' text"
                       + (f"; its down_proj is multiplied by residual_scale {scale:g}" if scale != 1 else ""))
    unused = " (its prompts are not used: the gate reads no text)" if shared.name in spec.calibration else ""
    return text + (f"its gate row is 0, so the gate is sigmoid(0) = 1/2 for every token (a bias-free sigmoid gate is "
                   f"constant only there){unused}; its down_proj is multiplied by {merge.down_factor(shared):g} "
                   f"(2 x residual_scale {scale:g}), so it adds exactly {scale:g} x its FFN output")


def resolve_router_init(spec: MergeSpec) -> str:
    """`auto`: calibrated when every domain expert has calibration text, else normal (a zero router would
    tie every logit: every token would use the first top-k experts, or whichever an engine's tie-break picks)."""
    if spec.router_init != "auto":
        return spec.router_init
    names = [name for name, _ in spec.experts]
    return "calibrated" if names and all(name in spec.calibration for name in names) else "normal"


def resolve_non_ffn(spec: MergeSpec) -> str:
    """`auto`: regmean++ when the routers are calibrated (every expert has calibration text, which RegMean++ runs
    on), else average. On the BTX world (docs/merge.md) RegMean++ beat the average on every domain and cost
    less than RegMean, which runs every model a second time."""
    if spec.non_ffn != "auto":
        return spec.non_ffn
    names = [name for name, _ in spec.experts]
    texts = names and all(name in spec.calibration for name in names)
    return "regmean++" if spec.router_init == "calibrated" and texts else "average"


def reference_tokenizer(merge: Merge):
    tokenizer = load_tokenizer(merge.reference.checkpoint.directory)
    if tokenizer is None:
        raise SurgeryError(f"{merge.reference.checkpoint.directory}: no tokenizer files; --router-init "
                           f"{merge.spec.router_init} tokenizes the calibration text with the model's tokenizer")
    return tokenizer
