"""What a merge writes about itself: the provenance of every expert and of the non-FFN weights (in the shards'
metadata) and the model card (README.md beside the weights)."""

from __future__ import annotations

from surgery import families as arch
from surgery.btx.members import Merge
from surgery.btx.spec import REGMEAN, SEED_NAME

ALPHA = 0.9  # RegMean: the off-diagonal scale of each Gram matrix; read at call time (bench_regmean_alpha sets it)


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
