"""Ideas for `bench/bench_btx.py` that change weights after the merge, measured beside the merges (not built into
`surgery merge`): each takes a written merge, refits some of its weights against the domain experts on their
calibration text (never the held-out text) and returns the held-out losses of `evaluator`."""

from __future__ import annotations

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

    from surgery.execution.loading import load_model, load_tokenizer
    from surgery.execution.batches import text_batches

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

