"""`surgery merge`: Branch-Train-MiX. Domain-trained copies of one seed become one MoE.

FFN of layer l of model i -> expert i of MoE layer l (bit-exact copies); ``--include-seed`` adds the
seed's FFN as one more expert (the BTX paper's generalist). Every other tensor (embeddings,
attention, norms, lm_head) is the weighted mean of all models (seed included when given),
computed in float32 and cast to the output dtype, one output tensor at a time; ``--non-ffn
seed|NAME`` copies one model's instead (mergekit-moe's behaviour). Routers: see
``surgery.btx_router``.

Memory: the zero, normal and embedding inits stream (about one tensor in memory, like every
plan). The calibrated init writes the merge as a draft beside OUT with its routers deferred, runs the
draft layer by layer (``surgery.btx_router.fit_calibrated``) and writes the fitted rows into it before
it becomes OUT: peak memory is one merged decoder layer in the compute dtype plus the calibration
hidden states, and every weight is read and averaged once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import click

from surgery import families as arch
from surgery import console
from surgery.compat import Member, check_compatible
from surgery.errors import SurgeryError
from surgery.merge_config import FITS_DEFAULT, SEED_NAME, MergeSpec
from surgery.moe_plan import INERT_SHARED_FFN, inert_shared_expert, inert_shared_note
from surgery.execution.session import RunSettings, run_options
from surgery.operations.output import OutputOptions, PostWriteCheck, dtype_option, output_options, write
from surgery.plan import Plan
from surgery.recipes import Copy, Init, Recipe
from surgery.seeds import router_seed

ROUTER_STD = 0.02
# Qwen2-MoE always builds a shared expert; a merge writes an all-zero one (it adds exactly 0), with
# 8 neurons as `surgery upcycle` does, so that tensor-parallel engines can split it.
MEAN_BLOCK_BYTES = 16 * 2**20  # float32 bytes of one block of rows read per input


class BlockedMean(Recipe):
    """sum_i w_i * x_i / sum_i w_i of one tensor name across models, in float32, read in blocks of rows.

    The arithmetic per element is that of ``plan.WeightedMean`` (x_0 * (w_0/W), then + x_i * (w_i/W)
    in order, every step rounded to float32), done in numpy: a merge of float32/float16 models needs
    no torch at all. Reading row blocks keeps memory at the output tensor plus two blocks.
    """

    def __init__(self, checkpoints: list, name: str, weights: list[float], block_bytes: int = MEAN_BLOCK_BYTES):
        self.checkpoints, self.name, self.weights, self.block_bytes = checkpoints, name, weights, block_bytes

    def inputs(self):
        return [(checkpoint, self.name) for checkpoint in self.checkpoints]

    def describe(self):
        return "mean(" + ", ".join(f"{w:g}*{c.label or c.directory}" for w, c in zip(self.weights, self.checkpoints)) + ")"

    def numpy_ready(self, dtype):
        from surgery.recipes import NUMPY_FLOATS

        stored = {checkpoint.info(self.name).dtype for checkpoint in self.checkpoints}
        return dtype in NUMPY_FLOATS and stored <= {*NUMPY_FLOATS, "BF16"}  # float8 needs torch (_as_float32)

    def compute(self):
        import torch

        return torch.from_numpy(self.compute_array("F32"))

    def compute_rows(self, rows):
        """Rows `rows` of the mean, with compute_array's arithmetic (each row reads only itself)."""
        import numpy as np
        import torch

        total = float(sum(self.weights))
        result = None
        for checkpoint, weight in zip(self.checkpoints, self.weights):
            value = checkpoint.read_rows(self.name, rows).float().numpy()
            factor = np.float32(weight / total)
            if result is None:
                result = np.multiply(value, factor)
            else:
                np.add(result, np.multiply(value, factor), out=result)
        return torch.from_numpy(result)

    def compute_array(self, dtype):
        import math

        import numpy as np

        from surgery.recipes import NUMPY_FLOATS

        shape = tuple(self.checkpoints[0].info(self.name).shape)
        total = float(sum(self.weights))
        factors = [np.float32(weight / total) for weight in self.weights]
        result = np.empty(shape, dtype=np.float32)
        rows = shape[0] if shape else 1
        row_elements = math.prod(shape[1:]) if shape else 1
        flat = result.reshape(rows, row_elements)
        step = max(1, self.block_bytes // (4 * max(row_elements, 1)))
        product = np.empty((min(step, rows), row_elements), dtype=np.float32)
        scratch = {}  # stored dtype -> one reusable block buffer of raw values
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            target = flat[start:stop]
            for index, (checkpoint, factor) in enumerate(zip(self.checkpoints, factors)):
                stored = checkpoint.info(self.name).dtype
                if stored not in scratch:
                    scratch[stored] = np.empty((min(step, rows), row_elements), dtype=_raw_numpy(stored))
                block = scratch[stored][:stop - start]
                _read_rows_into(checkpoint, self.name, start, stop, block)
                value = _as_float32(block, stored)
                if index == 0:
                    np.multiply(value, factor, out=target)
                else:
                    np.multiply(value, factor, out=product[:stop - start])
                    np.add(target, product[:stop - start], out=target)
        return result if dtype == "F32" else result.astype(NUMPY_FLOATS.get(dtype, "float32"))


def _raw_numpy(stored: str) -> str:
    """The numpy dtype that holds stored values as they are: the float itself, else raw bits."""
    from surgery.recipes import NUMPY_FLOATS
    from surgery.safetensors_format import DTYPE_SIZES

    return NUMPY_FLOATS.get(stored) or {1: "uint8", 2: "uint16"}[DTYPE_SIZES[stored]]


def _as_float32(block, stored: str):
    """float32 values of a block of stored values (bfloat16 is the top half of a float32: exact)."""
    import numpy as np

    if stored == "F32":
        return block
    if stored == "BF16":
        return (block.astype(np.uint32) << 16).view(np.float32)
    if block.dtype.kind == "f":  # F16, F64
        return block.astype(np.float32)
    import torch  # float8: numpy has no such type

    from surgery.checkpoint import torch_dtype

    return torch.from_numpy(block).view(torch_dtype(stored)).to(torch.float32).numpy()


def _read_rows_into(checkpoint, name: str, start: int, stop: int, out) -> None:
    """Rows start:stop of a stored tensor, read with positioned reads straight into numpy array `out`."""
    from surgery.safetensors_format import pread_into

    info = checkpoint.info(name)
    rows = info.shape[0] if info.shape else 1
    if not 0 <= start <= stop <= rows or out.nbytes * rows != info.nbytes * (stop - start):
        raise SurgeryError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, cannot read rows {start}:{stop}")
    row_bytes = info.nbytes // rows if rows else 0
    if out.nbytes:
        pread_into(checkpoint._fd(info.file), memoryview(out).cast("B"), info.offset + row_bytes * start, info.file, name)


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
                             expert_ffn=dims["ffn"], shared_ffn=INERT_SHARED_FFN if target.shared_expert else None)
    if target.shared_expert:
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


# ------------------------------------------------------------------ the plan
def non_ffn_recipe(merge: Merge):
    """Weighted mean over every model with a positive weight, or a copy of one model (--non-ffn)."""
    choice = merge.spec.non_ffn
    if choice != "average":
        member = merge.member(choice)
        return lambda expected, name: Copy(member.checkpoint, name)
    averaged = [m for m in merge.members if merge.weights[m.name] != 0]

    def recipe(expected, name):
        if len(averaged) == 1:
            return Copy(averaged[0].checkpoint, name)
        return BlockedMean([m.checkpoint for m in averaged], name, [merge.weights[m.name] for m in averaged])

    return recipe


def router_recipe(merge: Merge, embedding_router):
    init = merge.spec.router_init
    hidden = merge.config["hidden_size"]
    shape = (len(merge.experts), hidden)

    def recipe(layer: int):
        from surgery.btx_router import PendingRouter

        if init == "zero":
            return Init("zero", shape)
        if init == "normal":
            return Init("normal", shape, seed=router_seed(merge.spec.router_seed, layer), std=ROUTER_STD)
        if init == "embedding":
            return embedding_router
        domains = ", ".join(d.name for d in merge.domains())
        return PendingRouter(f"calibrated on {domains} ({merge.spec.router_fit}; fitted layer by layer on the "
                             "written draft)", layer)

    return recipe


def _embedding_router(merge: Merge, embed_recipe):
    from surgery.btx_router import LazyRouter

    cache = {}

    def compute():
        if "rows" not in cache:
            from surgery.btx_router import embedding_rows

            tokenizer = _tokenizer(merge)
            cache["rows"] = embedding_rows(embed_recipe.compute(), tokenizer, merge.domains(), len(merge.experts),
                                           merge.spec.calibration_tokens)
        return cache["rows"]

    names = ", ".join(d.name for d in merge.domains())
    return LazyRouter(f"mean input embedding of calibration text ({names})", compute)


def _tokenizer(merge: Merge):
    from surgery.loading import load_tokenizer

    tokenizer = load_tokenizer(merge.reference.checkpoint.directory)
    if tokenizer is None:
        raise SurgeryError(f"{merge.reference.checkpoint.directory}: no tokenizer files; --router-init "
                           f"{merge.spec.router_init} tokenizes the calibration text with the model's tokenizer")
    return tokenizer


def build_plan(merge: Merge) -> Plan:
    """Every output tensor of the merged MoE with its recipe, from headers only.

    Calibrated routers are Deferred: fitted on the written draft (``_run_calibrated``).
    """
    from surgery.moe_plan import dense_ffn_names, moe_tensors, provenance

    family, target = merge.source_family, merge.target
    non_ffn = non_ffn_recipe(merge)
    embed_name = family.spec("embedding", "embed").name()
    embedding_router = None
    if merge.spec.router_init == "embedding":
        embedding_router = _embedding_router(merge, non_ffn(None, embed_name))
    router = router_recipe(merge, embedding_router)

    def ffn_recipe(expected):
        if expected.group == "router":
            return router(expected.layer)
        if expected.group == "shared_expert":  # qwen2_moe always has one
            return inert_shared_expert(expected)
        if expected.group == "experts":
            member = merge.experts[expected.expert]
            return Copy(member.checkpoint, dense_ffn_names(family, expected.layer)[expected.role])
        raise SurgeryError(f"{target.name}: merge cannot fill {expected.group} tensor {expected.name}")

    reference = merge.reference.checkpoint
    tensors = moe_tensors(target, merge.config, reference, family, ffn_recipe, merge.dtype, non_ffn)
    options = merge.spec.to_options()
    options["router_init"] = merge.spec.router_init
    metadata = provenance([m.checkpoint for m in merge.members], options)
    metadata["surgery_experts"] = json.dumps(expert_provenance(merge))
    metadata["surgery_non_ffn"] = json.dumps(non_ffn_description(merge))
    notes = list(merge.notes)
    return Plan("merge", tensors, merge.config, [m.checkpoint for m in merge.members],
                side_files=reference.side_files(), extra_files={"README.md": model_card(merge)},
                metadata=metadata, notes=notes)


def expert_provenance(merge: Merge) -> list[dict]:
    return [{"expert": index, "name": member.name, "source": str(member.checkpoint.path),
             "weight": merge.weights[member.name], "role": "seed (generalist)" if member.name == SEED_NAME else "domain"}
            for index, member in enumerate(merge.experts)]


def non_ffn_description(merge: Merge) -> dict:
    if merge.spec.non_ffn != "average":
        return {"method": "copy", "from": merge.spec.non_ffn}
    total = sum(merge.weights.values())
    return {"method": "weighted mean (float32)",
            "weights": {m.name: merge.weights[m.name] / total for m in merge.members if merge.weights[m.name] != 0}}


def model_card(merge: Merge, routing_text: str | None = None) -> str:
    spec, config = merge.spec, merge.config
    expert_ffn = arch.dimensions(merge.source_family, merge.reference.checkpoint.config)["ffn"]
    rows = "\n".join(f"| {e['expert']} | {e['name']} | `{e['source']}` | {e['weight']:g} | {e['role']} |"
                     for e in expert_provenance(merge))
    described = non_ffn_description(merge)
    if described["method"] == "copy":
        non_ffn = f"copied from **{described['from']}** (mergekit-moe's behaviour)"
    else:
        non_ffn = "weighted mean in float32 of " + ", ".join(f"{name} ({w:.3g})" for name, w in described["weights"].items())
    calibration = "".join(f"\n- {name}: {c.source}" for name, c in sorted(spec.calibration.items()))
    text = f"""# Branch-Train-MiX merge

Written by `surgery merge` (Branch-Train-MiX, Sukhbaatar et al. 2024): the FFN of layer l of each
model below is expert e of MoE layer l, copied bit for bit; every other tensor (embeddings,
attention, norms, lm_head) is {non_ffn}.

- format: `{merge.target.architecture}` ({merge.target.name}), {len(merge.experts)} experts, top-{spec.top_k}
- layers: {config['num_hidden_layers']}, hidden size {config['hidden_size']}, expert FFN size {expert_ffn}
- router init: {spec.router_init}{f" ({spec.router_fit})" if spec.router_init == "calibrated" else ""}
- dtype: {config.get('dtype')}

| expert | name | source | averaging weight | role |
|---|---|---|---|---|
{rows}
"""
    if spec.seed and not spec.include_seed:
        text += f"\nThe seed (`{merge.member(SEED_NAME).checkpoint.path}`) takes part in the average only.\n"
    if calibration:
        text += f"\nCalibration text:{calibration}\n"
    if routing_text:
        text += ("\n## Routing on the calibration text\n\nMean routing weight (softmax, top-k, renormalised) "
                 "that each expert receives on each domain's tokens, per layer:\n\n" + routing_text)
    text += ("\nThe router is a starting point: BTX fine-tunes the merged model (routers with a load-balancing "
             "loss) afterwards.\n")
    return text


# ------------------------------------------------------------------ running
def run_merge(merge: Merge, out: Path, output: OutputOptions = OutputOptions(), settings=None):
    """Write the merge (calibrated routers: fitted on the written draft); returns a ``Result``."""
    from surgery.execution.session import RunSettings

    output.check()
    settings = settings or RunSettings()
    from surgery.layouts import convert

    plan = convert(build_plan(merge), output.layout)  # before the deferred routers are named
    check = PostWriteCheck([m.checkpoint.path for m in merge.members], exact=False, settings=settings)
    if merge.spec.router_init != "calibrated" or output.dry_run:
        return write(plan, out, output, check=check)
    return _run_calibrated(merge, plan, Path(out), output, check)


def _run_calibrated(merge: Merge, plan: Plan, out: Path, output: OutputOptions, check: PostWriteCheck):
    """Write the merge with its routers deferred, run that draft layer by layer fitting each router, and write
    the fitted rows into it: every weight is read and computed once."""
    from surgery.btx_router import PendingRouter, calibration_parts, fit_calibrated, print_routing, routing_table_text
    from surgery.checkpoint import Checkpoint
    from surgery.execution.weights import ModelWeights
    from surgery.io.deferred import Filled
    from surgery.writer import check_output_path

    check_output_path(out, plan.sources, output.force)
    parts = calibration_parts(merge, _tokenizer(merge))  # a bad calibration text is refused before writing
    names = {d.expert: d.name for d in merge.domains()}
    routers = {t.name: t.recipe.layer for t in plan.tensors if isinstance(t.recipe, PendingRouter)}

    def fill(draft: Path) -> Filled:
        console.info(f"calibrated routers: running the merged model layer by layer on {len(names)} domains "
                     f"({', '.join(names.values())}) and fitting {len(routers)} routers")
        with Checkpoint.open(draft) as checkpoint:
            fit = fit_calibrated(merge, ModelWeights.from_checkpoint(checkpoint), parts, check.settings,
                                 spill_dir=out.resolve().parent)
        domain_names = [names[e] for e in sorted(names)]
        expert_names = [m.name for m in merge.experts]
        print_routing(fit, domain_names, expert_names)
        card = model_card(merge, routing_table_text(fit, domain_names, expert_names))
        return Filled({name: fit.routers[layer] for name, layer in routers.items()}, {"README.md": card})

    return write(plan, out, output, check=check, fill=fill)


# ------------------------------------------------------------------ command line
@click.command("merge")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--expert", "expert", multiple=True, metavar="NAME=PATH",
              help="A domain-trained model; its FFNs become expert i (in the order given). Repeat per expert.")
@click.option("--config", "config_file", type=click.Path(path_type=str),
              help="A YAML file with the merge (ours or a mergekit-moe config); options given here override it.")
@click.option("--seed", "seed", metavar="PATH", help="The seed model the experts were branched from (averaged in).")
@click.option("--include-seed", is_flag=True, help="Add the seed's FFN as one more (generalist) expert.")
@click.option("--weights", multiple=True, metavar="NAME=W,...",
              help="Averaging weights of the non-FFN tensors (default 1 each; the seed is named 'seed').")
@click.option("--non-ffn", default="average", show_default=True, metavar="average|seed|NAME",
              help="Average non-FFN tensors over all models, or copy one model's (mergekit's behaviour).")
@click.option("--top-k", "-k", type=int, default=2, show_default=True, help="Experts per token.")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", *arch.moe_formats()]), help="Output MoE format.")
@click.option("--router-init", default="auto", show_default=True,
              type=click.Choice(["auto", "zero", "normal", "embedding", "calibrated"]),
              help="auto: calibrated when every expert has --calibration text, else normal (a zero router ties every logit).")
@click.option("--router-fit", default=FITS_DEFAULT, show_default=True, type=click.Choice(["logistic", "class-mean"]),
              help="How calibrated routers are fitted per layer.")
@click.option("--calibration", multiple=True, metavar="NAME=FILE", help="Text of an expert's domain. Repeat per expert.")
@click.option("--calibration-tokens", type=int, default=16384, show_default=True,
              help="Calibration tokens used per domain.")
@click.option("--router-seed", type=int, default=0, show_default=True, help="Seed of --router-init normal.")
@dtype_option
@run_options
@output_options
def command(out, expert, config_file, seed, include_seed, weights, non_ffn, top_k, fmt, router_init, router_fit,
            calibration, calibration_tokens, router_seed, dtype, device, memory_budget, compute_dtype, output):
    """Merge domain-trained copies of one seed model into a Mixture-of-Experts (Branch-Train-MiX).

    \b
    surgery merge OUT --seed seed --expert code=code --expert prose=prose --calibration code=code.txt ...
    surgery merge OUT --config merge.yml
    """
    from surgery.merge_config import check_spec, load_config, spec_from_options

    values = dict(expert=expert, seed=seed, include_seed=include_seed, weights=weights, non_ffn=non_ffn, top_k=top_k,
                  fmt=fmt, router_init=router_init, router_fit=router_fit, calibration=calibration, dtype=dtype,
                  router_seed=router_seed, calibration_tokens=calibration_tokens)
    if config_file:
        if expert:
            raise SurgeryError(f"--config {config_file} lists the experts; do not also give --expert")
        spec = load_config(config_file)
        _override(spec, values, click.get_current_context())
        check_spec(spec, where=str(config_file))
    else:
        spec = spec_from_options(expert, seed, include_seed, weights, non_ffn, top_k, fmt, router_init, calibration,
                                 dtype, router_seed, calibration_tokens, router_fit)
    run(spec, out, output, RunSettings(device, memory_budget, compute_dtype))


def run(spec: MergeSpec, out, output: OutputOptions = OutputOptions(), settings=None):
    """Merge as `spec` says into OUT (the command and ``surgery.merge`` both land here); returns a ``Result``."""
    settings = settings or RunSettings()
    settings.check()
    output.check()
    spec.router_init = resolve_router_init(spec)
    merge = open_merge(spec)
    try:
        return run_merge(merge, Path(out), output, settings)
    finally:
        for member in merge.members:
            member.checkpoint.close()


def _override(spec: MergeSpec, values: dict, ctx) -> None:
    """Options given on the command line win over the YAML file."""
    from click.core import ParameterSource

    from surgery.merge_config import parse_weights, read_calibration

    def given(name):
        return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE

    simple = {"seed": "seed", "include_seed": "include_seed", "non_ffn": "non_ffn", "top_k": "top_k", "fmt": "format",
              "router_init": "router_init", "router_fit": "router_fit", "dtype": "dtype", "router_seed": "router_seed",
              "calibration_tokens": "calibration_tokens"}
    for option, attribute in simple.items():
        if given(option):
            setattr(spec, attribute, values[option])
    if given("weights"):
        spec.weights.update(parse_weights(values["weights"]))
    if given("calibration"):
        from surgery.merge_config import parse_pair

        for item in values["calibration"]:
            name, path = parse_pair(item, "--calibration", "FILE")
            spec.calibration[name] = read_calibration(path)
