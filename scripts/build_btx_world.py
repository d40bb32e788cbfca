#!/usr/bin/env python3
"""Build a small Branch-Train-MiX world on CPU: a seed Llama and three domain experts.

Offline and seeded; nothing is downloaded:

* code: the running Python's standard-library ``*.py`` sources (the file list of
  ``scripts/train_demo_model.py``), every 10th file held out;
* prose: English documentation prose that ships with Python: the reference-manual topics of
  ``pydoc_data.topics`` and the stdlib's LICENSE.txt, every 10th topic held out;
* math: generated arithmetic (``417 + 286 = 703``, ``(12 + 7) * 3 = 57`` ...), held-out lines from
  another random stream.

A byte-level BPE tokenizer (``train_tokenizer`` of the demo script) is trained on the three
training texts; the seed Llama (about 1M parameters, ~4 MB) is trained on an equal mix of the
domains; each expert is a copy of the seed trained further on one domain only. Output (``--out``):

    seed/ code/ prose/ math/        transformers checkpoints, identical tokenizer files
    data/<domain>.calibration.txt   training text of the domain, for router calibration
    data/<domain>.heldout.txt       held-out text of the domain, for evaluation
    world.json                      settings, timings and held-out loss of every model

About 10 minutes on 2 free cores with the defaults (``--threads 1`` is faster on a busy machine);
``--quick`` builds a smoke-test world (2 layers, hidden 64) in about a minute.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo_model as demo  # noqa: E402  (tokenizer, file list, schedule and loss of the demo model)

DOMAINS = ("code", "prose", "math")


# ------------------------------------------------------------------ data
def code_texts(train_bytes: int, heldout_bytes: int):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, heldout, _, _ = demo.split_files(demo.list_stdlib_files(stdlib), 10, train_bytes, heldout_bytes)
    return [text for _, text in train], [text for _, text in heldout]


def prose_texts(train_bytes: int, heldout_bytes: int):
    import pydoc_data.topics

    documents = [pydoc_data.topics.topics[key].strip() for key in sorted(pydoc_data.topics.topics)]
    license_file = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if license_file.is_file():
        documents.append(license_file.read_text(encoding="utf-8", errors="replace"))
    train, heldout = [], []
    for index, text in enumerate(documents):
        (heldout if index % 10 == 5 else train).append(text)
    return _cap(train, train_bytes), _cap(heldout, heldout_bytes)


def math_line(rng: random.Random) -> str:
    kind = rng.randrange(5)
    a, b, c = rng.randrange(1000), rng.randrange(1000), rng.randrange(2, 10)
    if kind == 0:
        return f"{a} + {b} = {a + b}"
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"{a} - {b} = {a - b}"
    if kind == 2:
        a, b = a % 100, b % 100
        return f"{a} * {b} = {a * b}"
    if kind == 3:
        a, b = a % 50, b % 50
        return f"({a} + {b}) * {c} = {(a + b) * c}"
    quotient, divisor = a % 200, c
    return f"{quotient * divisor} / {divisor} = {quotient}"


def math_texts(train_bytes: int, heldout_bytes: int, seed: int):
    def make(rng, size):
        documents, total = [], 0
        while total < size:
            document = "\n".join(math_line(rng) for _ in range(40)) + "\n"
            documents.append(document)
            total += len(document)
        return documents

    return make(random.Random(seed), train_bytes), make(random.Random(seed + 1_000_003), heldout_bytes)


def _cap(documents: list[str], size: int) -> list[str]:
    out, total = [], 0
    for document in documents:
        if total >= size:
            break
        out.append(document)
        total += len(document.encode("utf-8"))
    return out


# ------------------------------------------------------------------ training
def batch_from(stream: torch.Tensor, seq_len: int, count: int, generator: torch.Generator):
    starts = torch.randint(0, len(stream) - seq_len - 1, (count,), generator=generator).tolist()
    x = torch.stack([stream[s:s + seq_len] for s in starts])
    y = torch.stack([stream[s + 1:s + seq_len + 1] for s in starts])
    return x, y


def train(model, streams: list[torch.Tensor], steps: int, args, lr: float, seed: int, label: str) -> float:
    """AdamW with warmup + cosine; every batch draws equally from `streams`."""
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    per_stream = args.batch_size // len(streams)
    started = time.time()
    running = None
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = demo.lr_at(step, steps, min(args.warmup, steps // 5 + 1), lr)
        parts = [batch_from(stream, args.seq_len, per_stream, generator) for stream in streams]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % args.log_every == 0 or step == steps - 1:
            print(f"{label:6s} step {step:4d}  loss {running:.3f}  {time.time() - started:5.0f}s", flush=True)
    model.eval()
    return time.time() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (not committed)")
    parser.add_argument("--quick", action="store_true", help="a smaller, faster world (about two minutes)")
    parser.add_argument("--seed-steps", type=int, default=600)
    parser.add_argument("--expert-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--expert-lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--intermediate-size", type=int, default=352)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--train-mb", type=float, default=1.0, help="training text per domain (MB)")
    parser.add_argument("--heldout-kb", type=float, default=80, help="held-out text per domain (KB)")
    parser.add_argument("--calibration-kb", type=float, default=64, help="calibration text per domain (KB)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:  # a smoke-test world: 2 layers, hidden 64
        args.seed_steps, args.expert_steps = min(args.seed_steps, 150), min(args.expert_steps, 80)
        args.hidden_size, args.intermediate_size, args.num_layers, args.vocab_size = 64, 176, 2, 512
        args.train_mb, args.heldout_kb, args.calibration_kb, args.eval_tokens = 0.2, 24, 16, 2048

    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    train_bytes, heldout_bytes = int(args.train_mb * 1e6), int(args.heldout_kb * 1e3)
    texts = {"code": code_texts(train_bytes, heldout_bytes), "prose": prose_texts(train_bytes, heldout_bytes),
             "math": math_texts(train_bytes, heldout_bytes, args.seed)}
    data = out / "data"
    data.mkdir(exist_ok=True)
    for domain, (train_docs, heldout_docs) in texts.items():
        (data / f"{domain}.heldout.txt").write_text("\n".join(heldout_docs), encoding="utf-8")
        calibration = "\n".join(train_docs)[:int(args.calibration_kb * 1e3)]
        (data / f"{domain}.calibration.txt").write_text(calibration, encoding="utf-8")
        print(f"{domain}: train {sum(map(len, train_docs)) / 1e6:.2f} MB in {len(train_docs)} documents, "
              f"held-out {sum(map(len, heldout_docs)) / 1e3:.0f} KB")

    tokenizer_dir = out / "seed"
    tokenizer_dir.mkdir(exist_ok=True)
    demo.train_tokenizer([t for domain in DOMAINS for t in texts[domain][0]], args.vocab_size, tokenizer_dir)
    tokenizer_files = sorted(p.name for p in tokenizer_dir.iterdir() if p.is_file())
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    streams = {domain: demo.encode_docs(tokenizer, texts[domain][0]) for domain in DOMAINS}
    heldout = {domain: demo.encode_docs(tokenizer, texts[domain][1]) for domain in DOMAINS}
    print("tokens: " + ", ".join(f"{d} {len(streams[d])} train / {len(heldout[d])} held-out" for d in DOMAINS))

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden_size,
                         intermediate_size=args.intermediate_size, num_hidden_layers=args.num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    seed_model = LlamaForCausalLM(config)
    timings = {"seed": train(seed_model, [streams[d] for d in DOMAINS], args.seed_steps, args, args.lr, args.seed,
                             "seed")}
    models = {"seed": seed_model}
    for number, domain in enumerate(DOMAINS):
        expert = copy.deepcopy(seed_model)
        timings[domain] = train(expert, [streams[domain]], args.expert_steps, args, args.expert_lr,
                                args.seed + 1 + number, domain)
        models[domain] = expert

    losses = {}
    for name, model in models.items():
        model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                                   eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id)
        directory = out / name
        model.save_pretrained(str(directory))
        if name != "seed":
            for file in tokenizer_files:
                (directory / file).write_bytes((tokenizer_dir / file).read_bytes())
        losses[name] = {d: round(demo.eval_loss(model, heldout[d], args.seq_len, 16, args.eval_tokens), 4)
                        for d in DOMAINS}
        print(f"{name:6s} held-out loss: " + "  ".join(f"{d} {v:.3f}" for d, v in losses[name].items()))
    world = {"domains": list(DOMAINS), "models": list(models), "args": vars(args), "train_seconds": timings,
             "heldout_loss": losses, "parameters": sum(p.numel() for p in seed_model.parameters()),
             "total_seconds": round(time.time() - started, 1), "ln_vocab": round(math.log(len(tokenizer)), 3)}
    (out / "world.json").write_text(json.dumps(world, indent=2) + "\n")
    print(f"world built in {world['total_seconds']:.0f} s: {out}")


if __name__ == "__main__":
    main()
