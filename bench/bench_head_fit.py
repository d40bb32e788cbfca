"""The head fit's optimiser (`surgery.btx.head_fit`): held-back KL and seconds of each way to run it, on one fit's data.

    python bench/bench_head_fit.py --world /tmp/btxworld

Runs the BTX world's default merge (RegMean++, head fit) once, keeping what ``fit_head`` is given (the merged
model's and each expert's last hidden states on the calibration tokens, the experts' heads, the RegMean++ head),
then fits the head from it in several ways. Every row holds back the same 10 % of each domain's tokens and keeps
the step where their KL is lowest; the table gives that KL (lower is better) and the fit's wall time.

- "fit_head": the shipped fit (Adam on minibatches of BATCH_TOKENS per domain, step cosine-decayed to 0);
- "full batch, constant step": Adam on every fitted token at each step, a constant step size (the first version);
- the other rows change one setting of the shipped fit: tokens per minibatch, first step size, steps, or no decay.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

from bench_btx import surgery_merge
from common import markdown_table


def captured_inputs(world: Path, work: Path) -> tuple:
    """(start head, [Domain]) as the default merge of the world hands them to ``fit_head``."""
    import surgery.btx.head_fit as head_fit

    seen = {}
    real = head_fit.fit_head

    def keep(start, domains, seed=0, max_steps=head_fit.MAX_STEPS, progress=None):
        seen["start"], seen["domains"] = start.clone(), list(domains)
        return real(start, domains, seed, 0, progress)  # no steps: the merge only has to finish

    head_fit.fit_head = keep
    try:
        surgery_merge(world, work / "merge", init="calibrated", non_ffn="regmean++", head_fit=True)
    finally:
        head_fit.fit_head = real
    return seen["start"], seen["domains"]


def variant(start, domains, *, batch: int | None, lr: float, steps: int, decay: bool, seed: int = 0) -> float:
    """Held-back KL of a fit like ``fit_head`` with one setting changed (`batch` None: every fitted token)."""
    import torch

    from surgery.btx.head_fit import HELD_BACK, CHECK_EVERY, Domain, _Buffers, _kl
    from surgery.seeds import derive

    parts = []
    for index, domain in enumerate(domains):  # the same held-back tokens as fit_head
        count = int(domain.merged.shape[0])
        order = torch.randperm(count, generator=torch.Generator().manual_seed(derive(seed, "head_fit", index)))
        held = max(1, int(HELD_BACK * count))
        fit_rows = order[held:]
        parts.append((domain, fit_rows, Domain(domain.merged[order[:held]], domain.expert[order[:held]], domain.head)))
    tokens = max(len(rows) if batch is None else min(batch, len(rows)) for _, rows, _ in parts)
    buffers = _Buffers(start, max(tokens, max(int(h.merged.shape[0]) for _, _, h in parts)))
    weight = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Adam([weight], lr=lr)
    draw = torch.Generator().manual_seed(derive(seed, "head_fit_batches"))
    best = sum(_kl(weight.detach(), h, buffers, grad=False) for _, _, h in parts) / len(parts)
    for step in range(1, steps + 1):
        grad = 0
        for domain, rows, _ in parts:
            if batch is not None and len(rows) > batch:
                rows = rows[torch.randperm(len(rows), generator=draw)[:batch]]
            grad = grad + _kl(weight.detach(), Domain(domain.merged[rows], domain.expert[rows], domain.head), buffers,
                              grad=True)
        weight.grad = grad / len(parts)
        if decay:
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        optimizer.step()
        if step % CHECK_EVERY == 0 or step == steps:
            with torch.no_grad():
                best = min(best, sum(_kl(weight.detach(), h, buffers, grad=False) for _, _, h in parts) / len(parts))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, help="a BTX world (scripts/build_btx_world.py)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from surgery.btx.head_fit import BATCH_TOKENS, LEARNING_RATE, MAX_STEPS, fit_head

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-head-fit-") as work:
        start, domains = captured_inputs(Path(args.world), Path(work))
    rows = []

    def timed(label, run):
        began = time.perf_counter()
        kl = run()
        rows.append([label, f"{kl:.4f}", f"{time.perf_counter() - began:.1f}"])
        print(f"  {label}: {kl:.4f}", file=sys.stderr, flush=True)

    timed(f"fit_head: minibatch {BATCH_TOKENS}, first step {LEARNING_RATE}, cosine, {MAX_STEPS} steps",
          lambda: fit_head(start, domains).kl)
    shipped = dict(batch=BATCH_TOKENS, lr=LEARNING_RATE, steps=MAX_STEPS, decay=True)
    changes = [("full batch, constant step 0.03, 600 steps (the first version)",
                dict(batch=None, lr=0.03, steps=600, decay=False)),
               ("minibatch, constant step (no decay)", dict(decay=False)),
               ("first step 0.03", dict(lr=0.03)), ("first step 0.1", dict(lr=0.1)),
               ("minibatch 512", dict(batch=512)), ("minibatch 1024", dict(batch=1024)),
               ("minibatch 512, 1600 steps", dict(batch=512, steps=1600)), ("400 steps", dict(steps=400))]
    for label, change in changes:
        timed(label, lambda change=change: variant(start, domains, **{**shipped, **change}))
    tokens = ", ".join(str(int(d.merged.shape[0])) for d in domains)
    print(f"\n## Head fit: held-back KL by optimiser setting\n\nOne fit's data from `{args.world}` (tokens per domain: "
          f"{tokens}; vocab {start.shape[0]}, hidden {start.shape[1]}; {args.threads} threads).\n")
    print(markdown_table(["fit", "held-back KL (nats/token)", "seconds"], rows))


if __name__ == "__main__":
    main()
