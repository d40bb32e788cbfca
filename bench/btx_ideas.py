"""Ideas for `bench/bench_btx.py` that change weights after the merge, measured beside the merges (not built into
`surgery merge`): each takes a written merge, refits some of its weights against the domain experts on their
calibration text (never the held-out text) and returns the held-out losses of `evaluator`."""

from __future__ import annotations

import sys
from pathlib import Path


def norms_and_routers(name: str) -> bool:
    return "norm" in name or name.endswith("mlp.gate.weight")


def with_attention(name: str) -> bool:
    return norms_and_routers(name) or "self_attn" in name


def distilled(world: Path, merged: Path, evaluator, train=norms_and_routers, steps: int = 60,
              lr: float = 0.01) -> dict:
    """Idea (or bound): after the calibrated merge, train the weights `train(name)` selects by distilling each
    domain's expert on its calibration text (KL(expert || merge), Adam, `steps` steps); returns held-out losses."""
    import torch

    from surgery.loading import load_model, load_tokenizer
    from surgery.samples import text_batches

    torch.manual_seed(0)
    model, tokenizer = load_model(merged, "cpu", "float32"), load_tokenizer(merged)
    experts = {d: load_model(world / d, "cpu", "float32") for d in evaluator.windows}
    batches = {d: list(text_batches(tokenizer, (world / "data" / f"{d}.calibration.txt").read_text(), batch_size=8,
                                    seq_len=128, max_tokens=16384)) for d in evaluator.windows}
    trained = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(train(name))
        trained += [parameter] if train(name) else []
    optimizer = torch.optim.Adam(trained, lr=lr)
    model.train()
    for step in range(steps):
        loss = 0.0
        for domain in evaluator.windows:
            batch = batches[domain][step % len(batches[domain])]
            with torch.no_grad():
                target = torch.log_softmax(experts[domain](input_ids=batch.input_ids,
                                                           attention_mask=batch.attention_mask).logits, -1)
            logp = torch.log_softmax(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
            kl = (target.exp() * (target - logp)).sum(-1)[batch.attention_mask.bool()].mean()
            loss = loss + kl / len(experts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return evaluator.losses(model)


def head_fitted(world: Path, merged: Path, evaluator, held_back: float = 0.1, lr: float = 0.01,
                max_steps: int = 1000, patience: int = 100) -> dict:
    """Idea: keep the merge's network, refit only its head: the head that best reproduces each domain's expert
    (KL(expert || merge) over the vocabulary) from the merged model's own last hidden states on that domain's
    calibration text. Convex in the head (a softmax regression on soft labels), started at the merge's head;
    full-batch Adam, stopped where the KL on `held_back` of the tokens (never fitted) is lowest."""
    import torch

    from surgery.loading import load_model, load_tokenizer
    from surgery.samples import text_batches

    torch.manual_seed(0)
    model, tokenizer = load_model(merged, "cpu", "float32"), load_tokenizer(merged)
    features, targets = [], []
    with torch.no_grad():
        for domain in evaluator.windows:
            expert = load_model(world / domain, "cpu", "float32")
            for batch in text_batches(tokenizer, (world / "data" / f"{domain}.calibration.txt").read_text(),
                                      batch_size=8, seq_len=128, max_tokens=16384):
                real = batch.attention_mask.bool()
                hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
                logits = expert(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                features.append(hidden[real])
                targets.append(torch.log_softmax(logits[real], -1))
    features, targets = torch.cat(features), torch.cat(targets)
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))
    held, fitted = order[:int(held_back * len(order))], order[int(held_back * len(order)):]

    def kl(head, rows):
        target = targets[rows]
        return (target.exp() * (target - torch.log_softmax(features[rows] @ head.T, -1))).sum(-1).mean()

    head = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    optimizer = torch.optim.Adam([head], lr=lr)
    with torch.no_grad():
        best = (float(kl(head, held)), 0, head.detach().clone())
    for step in range(1, max_steps + 1):
        optimizer.zero_grad()
        kl(head, fitted).backward()
        optimizer.step()
        if step % 10 == 0:
            with torch.no_grad():
                value = float(kl(head, held))
            if value < best[0]:
                best = (value, step, head.detach().clone())
            elif step - best[1] >= patience:
                break
    with torch.no_grad():
        model.lm_head.weight.copy_(best[2])
    print(f"  head fit: held-back KL {best[0]:.4f} at step {best[1]}", file=sys.stderr, flush=True)
    return evaluator.losses(model)
