"""The plan of a ``surgery merge``: every output tensor of the merged MoE with its recipe, from headers only.

``build_plan`` gives each expert FFN tensor a copy of its model's dense FFN, every other tensor the
recipe of ``non_ffn_recipe`` (a blocked weighted mean, or one model's copy) and each router the recipe
of ``router_recipe`` for ``--router-init`` (calibrated routers are deferred until the draft is written).
``model_card`` is the README written beside the weights, with the provenance of every expert.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from surgery import families as arch
from surgery.diversity import stream_seed
from surgery.errors import SurgeryError
from surgery.merge_config import REGMEAN, SEED_NAME
from surgery.merge_mean import BlockedMean, TokenWeightedMean
from surgery.merge_model import Merge, reference_tokenizer
from surgery.moe_plan import inert_shared_expert
from surgery.plan import Plan
from surgery.recipes import Apply, Copy, Init, Scale
from surgery.seeds import router_seed

ROUTER_STD = 0.02


def non_ffn_recipe(merge: Merge):
    """Weighted mean over every model with a positive weight, or a copy of one model, or (regmean) the linear
    layers fitted to each model's inputs and the rest averaged (--non-ffn)."""
    from surgery.merge_regmean import RegMeanTensor, regmean_module

    choice = merge.spec.non_ffn
    if choice not in ("average", *REGMEAN):
        member = merge.member(choice)
        return lambda expected, name: Copy(member.checkpoint, name)
    averaged = [m for m in merge.members if merge.weights[m.name] != 0]
    config = merge.reference.checkpoint.config

    def recipe(expected, name):
        if len(averaged) == 1:
            return Copy(averaged[0].checkpoint, name)
        module = regmean_module(merge.source_family, config, expected) if choice in REGMEAN else None
        if module is not None:
            return RegMeanTensor(name, expected.layer, module, plus=choice == "regmean++",
                                 head_fit=merge.spec.head_fit and expected.layer is None)
        if choice in REGMEAN and expected.group == "embedding":  # RegMean on one-hot inputs: token counts
            return TokenWeightedMean([m.checkpoint for m in averaged], name, [merge.weights[m.name] for m in averaged])
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

            tokenizer = reference_tokenizer(merge)
            cache["rows"] = embedding_rows(embed_recipe.compute(), tokenizer, merge.domains(), len(merge.experts),
                                           merge.spec.calibration_tokens, merge.negative_domains())
        return cache["rows"]

    names = ", ".join(d.name for d in merge.domains())
    return LazyRouter(f"mean input embedding of calibration text ({names})", compute)


def build_plan(merge: Merge) -> Plan:
    """Every output tensor of the merged MoE with its recipe, from headers only.

    Calibrated routers are Deferred: fitted on the written draft (``btx_merge._run_calibrated``).
    """
    from surgery.moe_plan import moe_tensors, provenance

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
        if expected.group == "shared_expert":  # inert (a format that always has one) unless a model's FFN is given
            if merge.shared is None:
                return inert_shared_expert(expected)
            if expected.role == "shared_gate":
                return shared_gate_recipe(merge, expected)
            return expert_ffn(merge, merge.shared, len(merge.experts), expected.layer, expected.role)
        if expected.group == "experts":
            return expert_ffn(merge, merge.experts[expected.expert], expected.expert, expected.layer, expected.role)
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


def expert_ffn(merge: Merge, member, index: int, layer: int, role: str):
    """One matrix of an expert (index: its place; the shared expert's is after the routed ones): the member's
    dense FFN matrix, bit for bit, unless noise_scale adds noise to it or a factor scales its down_proj."""
    from surgery.moe_plan import dense_ffn_names

    recipe = Copy(member.checkpoint, dense_ffn_names(merge.source_family, layer)[role])
    std = merge.spec.noise_scale.get(member.name, 0.0)
    if std:
        noise = FfnNoise(std, 1 if role == "down" else 0, stream_seed(merge.spec.router_seed, layer, index, f"noise_{role}"))
        recipe = Apply([recipe], noise, noise.describe())
    factor = merge.down_factor(member) if role == "down" else 1.0
    return Scale(recipe, factor) if factor != 1.0 else recipe


@dataclass
class FfnNoise:
    """N(0, std) added to every weight of one FFN matrix (mergekit-moe's noise_scale), with the noise mechanism
    of ``upcycle --noise`` (``diversity.add_noise``: every neuron, a seeded stream per layer, expert and matrix)."""

    std: float
    axis: int  # the neuron axis: rows of gate/up, columns of down
    seed: int

    def describe(self) -> str:
        return f"noise N(0, {self.std:g})"

    def __call__(self, weight):
        from surgery.diversity import add_noise

        return add_noise(weight, range(weight.shape[self.axis]), self.axis, self.std, self.seed)


def shared_gate_recipe(merge: Merge, expected):
    if merge.shared_gate == "fitted":
        from surgery.btx_router import PendingRouter

        text = merge.spec.calibration[merge.shared.name].source
        return PendingRouter(f"shared gate calibrated on {text} against the routed experts' text", expected.layer,
                             kind="shared_gate")
    return Init("zero", expected.shape)  # sigmoid(0) = 1/2 on every token; down_proj carries the factor 2


def expert_provenance(merge: Merge) -> list[dict]:
    rows = [{"expert": index, "name": member.name, "source": str(member.checkpoint.path),
             "weight": merge.weights[member.name], "role": "seed (generalist)" if member.name == SEED_NAME else "domain"}
            for index, member in enumerate(merge.experts)]
    if merge.shared:
        gate = "fitted gate" if merge.shared_gate == "fitted" else "constant gate 1/2"
        rows.append({"expert": "shared", "name": merge.shared.name, "source": str(merge.shared.checkpoint.path),
                     "weight": merge.weights[merge.shared.name], "role": f"shared expert ({gate})"})
    return rows


def non_ffn_description(merge: Merge) -> dict:
    if merge.spec.non_ffn not in ("average", *REGMEAN):
        return {"method": "copy", "from": merge.spec.non_ffn}
    total = sum(merge.weights.values())
    weights = {m.name: merge.weights[m.name] / total for m in merge.members if merge.weights[m.name] != 0}
    if merge.spec.non_ffn in REGMEAN:
        from surgery.merge_regmean import ALPHA

        inputs = ("the merged model's inputs at each layer" if merge.spec.non_ffn == "regmean++"
                  else "each model's own inputs")
        return {"method": f"{merge.spec.non_ffn} (alpha {ALPHA}, {inputs}) of the attention projections and the head; "
                          "embedding rows weighted by each model's calibration token counts (RegMean on one-hot "
                          "inputs); weighted mean (float32) of norms", "weights": weights}
    return {"method": "weighted mean (float32)", "weights": weights}


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
    calibration += "".join(f"\n- {name} (negative): {c.source}" for name, c in sorted(spec.negative.items()))
    changes = [f"{name}: + N(0, {std:g}) noise" for name, std in sorted(spec.noise_scale.items())]
    changes += [f"{m.name}: down_proj x {merge.down_factor(m):g}" for m in [*merge.experts, merge.shared]
                if m is not None and merge.down_factor(m) != 1.0]
    changed = f" (except: {'; '.join(changes)})" if changes else ""
    text = f"""# Branch-Train-MiX merge

Written by `surgery merge` (Branch-Train-MiX, Sukhbaatar et al. 2024): the FFN of layer l of each
model below is expert e of MoE layer l, copied bit for bit{changed}; every other tensor (embeddings,
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
    if calibration and spec.router_init in ("embedding", "calibrated"):  # the other inits read no text
        text += f"\nCalibration text:{calibration}\n"
    if routing_text:
        text += ("\n## Routing on the calibration text\n\nMean routing weight (softmax, top-k, renormalised) "
                 "that each expert receives on each domain's tokens, per layer:\n\n" + routing_text)
    text += ("\nThe router is a starting point: BTX fine-tunes the merged model (routers with a load-balancing "
             "loss) afterwards.\n")
    return text
