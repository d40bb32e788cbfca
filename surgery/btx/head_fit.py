"""`surgery merge --head-fit`: the merged model's head refitted to reproduce each domain's expert.

After RegMean++ the merge's network is fixed; only its head (``lm_head``) is refitted, so that the merged
model's own last hidden states X_d on domain d's calibration text give expert d's next-token distribution
there (expert d's own forward pass on the same tokens):

    minimise over W   (1 / D) sum_d mean_t KL( softmax(Y_dt W_d^T) || softmax(X_dt W^T) )

with Y_d expert d's last hidden states and W_d its head. This is a softmax regression on soft labels,
convex in W. It starts at the RegMean++ head and runs Adam on minibatches (``BATCH_TOKENS`` of each domain's
tokens per step, drawn by the one seed rule) with a step size decayed to zero on a cosine over ``MAX_STEPS``;
a share of each domain's tokens is held back from the fit, and the step where their KL is lowest is kept.

On the BTX world (bench/bench_head_fit.py) the held-back KL reached 0.2187 in 23 s with minibatches of 2048
tokens against 0.2184 in 169 s with full batches of 14746 tokens (constant step 0.03, 600 steps); the default
merge's mean ratio to the experts went from 1.107 (no head fit) to 1.067 (bench/results/btx-quality-headfit.md).

Cost: about 3 x tokens x hidden x vocab multiply-adds per step (``step_products``: the experts' logits are
recomputed in chunks of tokens rather than held, so memory is the heads, the hidden states and one chunk of logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgery import console
from surgery.execution.layer_pass import LayerPass
from surgery.execution.placement import GPU_HEADROOM
from surgery.execution.weights import ModelWeights
from surgery.seeds import derive
from surgery.units import format_bytes

HELD_BACK = 0.1  # share of each domain's tokens never fitted, to choose the step
BATCH_TOKENS = 2048  # per domain and step; a domain with fewer fitted tokens gives all of them
LEARNING_RATE = 0.05  # Adam's first step size, decayed on a cosine to 0 at MAX_STEPS; the BTX world's held-back KL
# (bench/bench_head_fit.py): 0.03 and 0.05 -> 0.2187, 0.1 -> 0.2196
MAX_STEPS = 800
CHECK_EVERY = 10  # steps between two looks at the held-back KL
AUTO_PRODUCTS = {"cpu": 10**13, "cuda": 10**16}  # by device kind: --head-fit auto runs fits of at most this many
# multiply-adds. The BTX world's takes 1.9e12 (about 25 s on 2 CPU cores); a 32000-token vocabulary takes 3.6e14 at
# hidden 768 (about an hour there) and 1.9e15 at hidden 4096 (by an operation count a minute on one H100-class GPU)
CHUNK_ELEMENTS = 2**24  # logits computed at once (tokens x vocab)


@dataclass
class Domain:
    """One domain's fitting data: the merged model's last hidden states on its tokens, the expert's last hidden
    states on the same tokens, and the expert's head."""

    merged: object  # [tokens, hidden]
    expert: object  # [tokens, hidden]
    head: object  # [vocab, hidden]


@dataclass
class HeadFit:
    head: object  # [vocab, hidden] float32, the kept step's
    start_kl: float  # held-back KL of the starting head
    kl: float  # held-back KL of the kept head
    step: int  # the kept step (0: the starting head)
    steps: int  # steps run


def fit_head(start, domains: list[Domain], seed: int = 0, max_steps: int = MAX_STEPS, progress=None) -> HeadFit:
    """Refit `start` ([vocab, hidden]) to the `domains` (see the module doc); every tensor on one device.
    Memory beyond the domains' tensors: a copy of the held-back tokens and of one minibatch."""
    parts = []  # per domain: (the rows fitted, the tokens held back as a Domain of their own)
    for index, domain in enumerate(domains):
        count = int(domain.merged.shape[0])
        order = torch.randperm(count, generator=torch.Generator().manual_seed(derive(seed, "head_fit", index)))
        order = order.to(domain.merged.device)
        held = max(1, int(HELD_BACK * count)) if count > 1 else 0
        whole = Domain(domain.merged.float(), domain.expert.float(), domain.head.float())
        parts.append((_Rows(whole, order[held:]), Domain(whole.merged[order[:held]], whole.expert[order[:held]],
                                                        whole.head)))
    buffers = _Buffers(start, max(max(min(BATCH_TOKENS, len(rows.rows)), int(held.merged.shape[0]))
                                  for rows, held in parts))
    weight = torch.nn.Parameter(start.detach().float().clone())
    optimizer = torch.optim.Adam([weight], lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_steps))
    draw = torch.Generator().manual_seed(derive(seed, "head_fit_batches"))

    def held_kl(head) -> float:
        return sum(_kl(head, held, buffers, grad=False) for _, held in parts) / len(parts)

    with torch.no_grad():
        first = held_kl(weight)
    best = (first, 0, weight.detach().clone())
    for step in range(1, max_steps + 1):
        weight.grad = sum(_kl(weight.detach(), fitted.batch(draw), buffers, grad=True)
                          for fitted, _ in parts) / len(parts)
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(1)
        if step % CHECK_EVERY == 0 or step == max_steps:
            with torch.no_grad():
                value = held_kl(weight)
            if value < best[0]:
                best = (value, step, weight.detach().clone())
    return HeadFit(best[2], first, best[0], best[1], max_steps)


def minibatch_tokens(domains: list[Domain]) -> int:
    """Tokens of one step of ``fit_head``, over all domains (an upper bound: the held-back tokens are not drawn)."""
    return sum(min(BATCH_TOKENS, int(d.merged.shape[0])) for d in domains)


def step_products(start, domains: list[Domain]) -> int:
    """Multiply-adds of one step of ``fit_head``: per token of a minibatch, the merge's logits, the expert's
    logits and the gradient, each tokens x vocab x hidden."""
    return 3 * minibatch_tokens(domains) * int(start.shape[0]) * int(start.shape[1])


def planned_products(vocab: int, hidden: int, domains: int) -> int:
    """Multiply-adds of a whole fit at most (every domain giving a full minibatch), from the config alone."""
    return MAX_STEPS * 3 * domains * BATCH_TOKENS * vocab * hidden


def planned_bytes(vocab: int, hidden: int, domains: int, tokens: int) -> int:
    """Memory of a fit on its device at most, by a count of its float32 tensors: each domain's expert head; the
    fitted head, its gradient, Adam's two moments and the best step's copy; each domain's merged and expert hidden
    states (`tokens` per domain); three chunk buffers of logits."""
    return 4 * ((domains + 5) * vocab * hidden + 2 * domains * tokens * hidden + 3 * CHUNK_ELEMENTS)


def auto_skip_reason(vocab: int, hidden: int, domains: int, tokens: int, device: str,
                     free_gpu_bytes: int | None = None) -> str | None:
    """Why ``--head-fit`` auto does not run the fit on `device` (None: it runs): its multiply-adds above the
    device kind's ``AUTO_PRODUCTS``, or on a GPU its memory above the free share (`free_gpu_bytes`)."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    products = planned_products(vocab, hidden, domains)
    cost = (f"{MAX_STEPS} steps of 3 x {domains} x {BATCH_TOKENS} tokens x {vocab} vocab x {hidden} hidden = "
            f"{products:.2g} multiply-adds")
    if products > AUTO_PRODUCTS[kind]:
        limits = f"{AUTO_PRODUCTS['cpu']:.0e} on a CPU, {AUTO_PRODUCTS['cuda']:.0e} on a GPU"
        return f"{cost}, above what it runs by itself on {device} ({limits})"
    needed = planned_bytes(vocab, hidden, domains, tokens)
    if kind == "cuda" and free_gpu_bytes is not None and needed > GPU_HEADROOM * free_gpu_bytes:
        return f"{cost}, needing about {format_bytes(needed)} of {device}'s {format_bytes(free_gpu_bytes)} free"
    return None


@dataclass
class _Rows:
    """A domain's fitted tokens: row indices into its tensors, which are never copied whole."""

    domain: Domain
    rows: object  # LongTensor

    def batch(self, draw) -> Domain:
        """BATCH_TOKENS of the rows, drawn without replacement (all of them when there are no more)."""
        rows = self.rows
        if len(rows) > BATCH_TOKENS:
            rows = rows[torch.randperm(len(rows), generator=draw)[:BATCH_TOKENS].to(rows.device)]
        return Domain(self.domain.merged[rows], self.domain.expert[rows], self.domain.head)


class _Buffers:
    """Three [chunk, vocab] buffers reused by every chunk of every step: a fresh tensor of that size would be a new
    mapping of memory, faulted in page by page (the runner keeps large blocks out of the heap)."""

    def __init__(self, head, tokens: int):
        vocab = int(head.shape[0])
        self.rows = max(1, min(tokens, CHUNK_ELEMENTS // vocab))
        self.merged, self.expert, self.scratch = (torch.empty(self.rows, vocab, device=head.device) for _ in range(3))


def _log_softmax_(logits, scratch):
    """log_softmax of `logits` in place (`scratch`: a buffer of the same shape)."""
    logits.sub_(logits.amax(-1, keepdim=True))
    torch.exp(logits, out=scratch)
    logits.sub_(scratch.sum(-1, keepdim=True).log_())
    return logits


def _kl(head, domain: Domain, buffers: _Buffers, grad: bool):
    """Mean KL(expert || merge) over the tokens of `domain`, or (`grad`) its gradient in `head`, chunk by chunk."""
    count = int(domain.merged.shape[0])
    total = torch.zeros_like(head) if grad else 0.0
    with torch.no_grad():
        for start in range(0, count, buffers.rows):
            features = domain.merged[start:start + buffers.rows]
            n = int(features.shape[0])
            logq, logp, scratch = buffers.merged[:n], buffers.expert[:n], buffers.scratch[:n]
            _log_softmax_(torch.mm(features, head.T, out=logq), scratch)
            _log_softmax_(torch.mm(domain.expert[start:start + n], domain.head.T, out=logp), scratch)
            if grad:  # d/dW of mean_t KL(p_t || softmax(W x_t)) = (q - p)^T X / n
                torch.exp(logq, out=scratch)
                total.addmm_(scratch.sub_(logp.exp_()).T, features, alpha=1.0 / count)
            else:
                torch.exp(logp, out=scratch)
                total += float(scratch.mul_(logp.sub_(logq)).sum()) / count
    return total


def fit_merged_head(members, tensor, start, hidden, merged: LayerPass):
    """``--head-fit`` of a RegMean++ merge (`members`: its ``regmean.MergedInputs``): each expert runs on its own
    domain's batches (its own last hidden states and head give the targets), the merged model's final norm gives
    the features on the same batches (`hidden`: the merged pass's last output), and ``fit_head`` refits `start`.
    Returns the fitted head ([vocab, hidden] float32)."""
    device = merged.placement.device
    features = {}
    merged.head(hidden, lambda batch, rows, logits, extra: features.setdefault(batch, []).append(
        extra["norm"][merged.real_tokens(batch, rows)].float()), norm_only=True)
    experts = {e.name for e in members.merge.experts}
    domains = []
    for member, indices, member_pass in zip(members.members, members.indices, members.passes):
        if member.name not in experts or not indices:  # each batch's rows are let go once joined
            continue
        own = LayerPass.for_settings(ModelWeights.from_checkpoint(member.checkpoint), member_pass.batches,
                                     members.settings, members.spill_dir)
        last = own.forward(description=None)
        mine = {}
        own.head(last, lambda batch, rows, logits, extra, own=own: mine.setdefault(batch, []).append(
            extra["norm"][own.real_tokens(batch, rows)].float()), norm_only=True)
        last.close()
        head = member.checkpoint.read(tensor.recipe.slot.source_name).float()
        domains.append(Domain(torch.cat([torch.cat(features.pop(i)) for i in indices]).to(device),
                              torch.cat([torch.cat(mine.pop(b)) for b in range(len(indices))]).to(device),
                              head.to(device)))
    console.info(f"head fit: {MAX_STEPS} steps on {device}, each about 3 x {minibatch_tokens(domains)} tokens x "
                 f"{start.shape[0]} vocab x {start.shape[1]} hidden = {step_products(start, domains) / 1e9:.3g} G "
                 "multiply-adds")
    with console.progress("fitting the head", MAX_STEPS, unit_bytes=False) as advance:
        fit = fit_head(start.to(device), domains, seed=members.merge.spec.router_seed, progress=advance)
    console.info(f"head fit: KL to the experts on held-back calibration tokens {fit.start_kl:.4f} -> {fit.kl:.4f} "
                 f"(step {fit.step} of {fit.steps} kept)")
    return fit.head.cpu()
