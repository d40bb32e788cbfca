"""What `surgery split` tells the user about a split it planned: sizes, sharing, padding, overlap, exactness."""

from __future__ import annotations

import numpy as np

from surgery.plan.moe import inert_shared_note


def plan_notes(partitions, layout, target, options, scale, ffn, summary, hits) -> list[str]:
    n, k = options.num_experts, options.top_k
    notes = []
    sizes = sorted({len(e) for p in partitions.values() for e in p.experts})
    shared = max(len(p.shared) for p in partitions.values())
    padding = sum(layout.expert_ffn * n - sum(len(e) for e in p.experts) - (len(p.shared) * n if layout.duplicated else 0)
                  for p in partitions.values())
    if not layout.duplicated and shared:  # a shared expert of real neurons padded to the largest one
        padding += sum(layout.shared_ffn - len(p.shared) for p in partitions.values())  # (not the inert one)
    text = f"{options.strategy} split into {n} experts of {layout.expert_ffn} neurons (top-{k}), expert scale {scale:g}"
    if summary:
        text += f"; {summary}"
    notes.append(text)
    if shared:
        where = ("duplicated into every routed expert (down columns unscaled: counted once)" if layout.duplicated
                 else f"a {target.name} shared expert" + (
                     f" (gate 0: sigmoid 0.5, down_proj x{1 / target.shared_scale:g})" if target.shared_scale != 1.0
                     else " (no gate: added whole)"))
        notes.append(f"{shared} shared neurons per layer, {where}")
    if padding:
        notes.append(f"uneven expert sizes {sizes[0]}-{sizes[-1]} (+{shared if layout.duplicated else 0} shared): "
                     f"padded with {padding} zero neurons in all (exact: a zero neuron adds nothing)")
    if not layout.duplicated and not shared and layout.shared_ffn:
        notes.append(inert_shared_note(target))
    overlap = [p.stats.get("neurons_in_several_experts", 0) for p in partitions.values()]
    if any(overlap):
        notes.append(f"experts overlap: up to {max(overlap)} neurons per layer held by several experts "
                     f"(down_proj factor scale/min(holders, k))")
    spreads = [p.stats["cosine_spread"] for p in partitions.values() if "cosine_spread" in p.stats]
    if spreads:
        free = [p.stats["unconstrained_cosine_spread"] for p in partitions.values()]
        notes.append(f"within-cluster cosine spread (mean 1 - cos to centroid): balanced {np.mean(spreads):.4f}, "
                     f"unconstrained k-means {np.mean(free):.4f} (layers: {', '.join(f'{s:.3f}' for s in spreads)})")
    coact = [p.stats["coactivation_within_experts"] for p in partitions.values() if "coactivation_within_experts" in p.stats]
    if coact:
        notes.append(f"co-activations kept inside an expert: {np.mean(coact):.1%} (random split: about {1 / n:.1%})")
    if hits:
        notes.append(f"calibrated router picks {np.mean(list(hits.values())):.1%} of the top-{k} experts by activation mass "
                     f"on calibration tokens")
    active = np.mean([(len(p.shared) + k * np.mean([len(e) for e in p.experts])) / ffn for p in partitions.values()])
    if k < n:
        notes.append(f"top-{k} of {n}: each token uses about {active:.0%} of the FFN neurons (the dense model uses all "
                     f"of them); --verify measures the loss change")
    elif options.router_init == "zero" and scale == n:
        notes.append("k = N with a zero router and expert scale N: every expert weighs 1/N, so the MoE computes the dense "
                     "FFN (exact up to float rounding; --verify checks it layer by layer)")
    else:
        notes.append(f"k = N, but with a {options.router_init} router or expert scale {scale:g} (not {n}) the experts' "
                     f"weights are not 1/N each: the MoE is close to, not exactly, the dense model")
    return notes
