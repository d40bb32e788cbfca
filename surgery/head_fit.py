"""`surgery merge --head-fit`: the merged model's head refitted to reproduce each domain's expert.

After RegMean++ the merge's network is fixed; only its head (``lm_head``) is refitted, so that the merged
model's own last hidden states X_d on domain d's calibration text give expert d's next-token distribution
there (expert d's own forward pass on the same tokens):

    minimise over W   (1 / D) sum_d mean_t KL( softmax(Y_dt W_d^T) || softmax(X_dt W^T) )

with Y_d expert d's last hidden states and W_d its head. This is a softmax regression on soft labels,
convex in W. It starts at the RegMean++ head and runs full-batch Adam; a share of each domain's tokens is
held back from the fit and the step where their KL is lowest is kept (the fit stops when it has not improved
for ``PATIENCE`` steps). On the BTX world (docs/merge.md) the mean ratio to the experts fell from 1.107 to 1.067.

Cost: about 3 x tokens x hidden x vocab multiply-adds per step (the experts' logits are recomputed in chunks
of tokens rather than held: memory is the heads, the hidden states and one chunk of logits).
"""

from __future__ import annotations

from dataclasses import dataclass

HELD_BACK = 0.1  # share of each domain's tokens never fitted, to choose the step
LEARNING_RATE = 0.03  # reached a lower held-back KL than 0.01 (which hit MAX_STEPS) and than 0.1 on the BTX world
MAX_STEPS = 1000
CHECK_EVERY = 10  # steps between two looks at the held-back KL
PATIENCE = 100  # steps without a better held-back KL before the fit stops
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
    """Refit `start` ([vocab, hidden]) to the `domains` (see the module doc); every tensor on one device."""
    import torch

    from surgery.seeds import derive

    parts = []  # per domain: (the tokens fitted, the tokens held back), each a Domain of contiguous rows
    for index, domain in enumerate(domains):
        count = int(domain.merged.shape[0])
        order = torch.randperm(count, generator=torch.Generator().manual_seed(derive(seed, "head_fit", index)))
        order = order.to(domain.merged.device)
        held = max(1, int(HELD_BACK * count)) if count > 1 else 0
        merged, expert = domain.merged[order].float(), domain.expert[order].float()
        parts.append((Domain(merged[held:], expert[held:], domain.head.float()),
                      Domain(merged[:held], expert[:held], domain.head.float())))
    buffers = _Buffers(start, max(int(d.merged.shape[0]) for pair in parts for d in pair))
    weight = torch.nn.Parameter(start.detach().float().clone())
    optimizer = torch.optim.Adam([weight], lr=LEARNING_RATE)

    def held_kl(head) -> float:
        return sum(_kl(head, held, buffers, grad=False) for _, held in parts) / len(parts)

    with torch.no_grad():
        first = held_kl(weight)
    best = (first, 0, weight.detach().clone())
    step = 0
    for step in range(1, max_steps + 1):
        weight.grad = sum(_kl(weight.detach(), fitted, buffers, grad=True) for fitted, _ in parts) / len(parts)
        optimizer.step()
        if progress is not None:
            progress(1)
        if step % CHECK_EVERY == 0:
            with torch.no_grad():
                value = held_kl(weight)
            if value < best[0]:
                best = (value, step, weight.detach().clone())
            elif step - best[1] >= PATIENCE:
                break
    return HeadFit(best[2], first, best[0], best[1], step)


class _Buffers:
    """Three [chunk, vocab] buffers reused by every chunk of every step: a fresh tensor of that size would be a new
    mapping of memory, faulted in page by page (the runner keeps large blocks out of the heap)."""

    def __init__(self, head, tokens: int):
        import torch

        vocab = int(head.shape[0])
        self.rows = max(1, min(tokens, CHUNK_ELEMENTS // vocab))
        self.merged, self.expert, self.scratch = (torch.empty(self.rows, vocab, device=head.device) for _ in range(3))


def _log_softmax_(logits, scratch):
    """log_softmax of `logits` in place (`scratch`: a buffer of the same shape)."""
    import torch

    logits.sub_(logits.amax(-1, keepdim=True))
    torch.exp(logits, out=scratch)
    logits.sub_(scratch.sum(-1, keepdim=True).log_())
    return logits


def _kl(head, domain: Domain, buffers: _Buffers, grad: bool):
    """Mean KL(expert || merge) over the tokens of `domain`, or (`grad`) its gradient in `head`, chunk by chunk."""
    import torch

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
