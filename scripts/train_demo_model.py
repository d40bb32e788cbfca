#!/usr/bin/env python3
"""Build the small demo checkpoint shipped in ``examples/demo-llama``.

Everything is deterministic and offline:

* Text: the running Python's own standard-library ``*.py`` sources
  (``sysconfig.get_paths()["stdlib"]``), sorted by relative path, with test
  suites, IDLE, lib2to3, codec tables and other generated/data files skipped.
  Every ``--holdout-every``-th file (by sorted index) is held out for
  evaluation and never seen by the tokenizer or the model; training uses the
  remaining files in sorted order up to ``--train-mb`` megabytes.
* Tokenizer: byte-level BPE (``tokenizers``), vocab ``--vocab-size``, with
  ``<s>``, ``</s>``, ``<unk>``, ``<pad>`` special tokens, saved as a
  transformers ``PreTrainedTokenizerFast`` (``tokenizer.json`` +
  ``tokenizer_config.json``).
* Model: a tiny ``LlamaForCausalLM`` trained on CPU with AdamW,
  linear warmup + cosine decay.

Also writes ``surgery/data/sample.txt``: a ~30 KB plain-text sample of
held-out stdlib source used for validation by the surgery tool.

Regenerate (from the repository root)::

    python scripts/train_demo_model.py

Results depend on the Python version whose stdlib is used (the README records
which one produced the shipped checkpoint).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sysconfig
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# Directories (relative to stdlib, any path component) never used.
SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "encodings",  # huge generated codec tables
    "pydoc_data",  # one giant generated string literal
    "ensurepip",
    "turtledemo",
    "__phello__",
}
SKIP_FILE_PREFIXES = ("_sysconfigdata", "test_")
SKIP_DIR_PREFIXES = ("config-",)

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def list_stdlib_files(stdlib: Path) -> list[Path]:
    files = []
    for p in stdlib.rglob("*.py"):
        rel = p.relative_to(stdlib)
        parts = rel.parts[:-1]
        if any(d in SKIP_DIRS or d.startswith(SKIP_DIR_PREFIXES) for d in parts):
            continue
        if rel.name.startswith(SKIP_FILE_PREFIXES):
            continue
        if not p.is_file():
            continue
        files.append(p)
    files.sort(key=lambda p: p.relative_to(stdlib).as_posix())
    return files


def read_text(p: Path) -> str | None:
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    text = text.replace("\r\n", "\n")
    return text if text.strip() else None


def split_files(files, holdout_every, train_bytes, eval_bytes):
    train, heldout = [], []
    n_train = n_eval = 0
    for i, p in enumerate(files):
        is_heldout = i % holdout_every == holdout_every // 2
        if is_heldout:
            if n_eval >= eval_bytes:
                continue
            text = read_text(p)
            if text is None:
                continue
            heldout.append((p, text))
            n_eval += len(text.encode("utf-8"))
        else:
            if n_train >= train_bytes:
                continue
            text = read_text(p)
            if text is None:
                continue
            train.append((p, text))
            n_train += len(text.encode("utf-8"))
    return train, heldout, n_train, n_eval


def make_sample(heldout, stdlib: Path, target=30_000, max_total=40_000, max_file=12_000):
    """Concatenate small whole held-out files into a ~30 KB sample."""
    chunks, total = [], 0
    for p, text in heldout:
        n = len(text.encode("utf-8"))
        if n > max_file or total + n > max_total:
            continue
        chunks.append(text if text.endswith("\n") else text + "\n")
        total += n
        if total >= target:
            break
    return "\n".join(chunks)


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    # Llama-style: prepend <s> to every encoded sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", bos_id)],
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.save_pretrained(str(out))
    # transformers 5 writes its internal class name ("TokenizersBackend");
    # "PreTrainedTokenizerFast" is understood by both transformers 4.x and 5.x.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return hf_tok


def encode_docs(tok, texts: list[str]) -> torch.Tensor:
    """One token stream: <s> doc </s> <s> doc </s> ..."""
    ids: list[int] = []
    eos = tok.eos_token_id
    # Encode with the raw `tokenizers` object: whole files are longer than
    # model_max_length, which is fine here (they are cut into windows later).
    for enc in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=True):
        enc = enc.ids
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------
# model / training
# --------------------------------------------------------------------------
def lr_at(step, total, warmup, peak, min_ratio=0.1):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def eval_loss(model, stream: torch.Tensor, seq_len: int, batch: int, max_tokens: int | None = None) -> float:
    model.eval()
    if max_tokens is not None:
        stream = stream[: max_tokens + 1]
    n = (len(stream) - 1) // seq_len
    total_loss, total_tok = 0.0, 0
    for b in range(0, n, batch):
        idx = range(b, min(n, b + batch))
        x = torch.stack([stream[i * seq_len : i * seq_len + seq_len] for i in idx])
        y = torch.stack([stream[i * seq_len + 1 : i * seq_len + seq_len + 1] for i in idx])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
        )
        total_loss += loss.item()
        total_tok += y.numel()
    model.train()
    return total_loss / max(1, total_tok)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="examples/demo-llama", help="output checkpoint directory")
    ap.add_argument("--sample-out", default="surgery/data/sample.txt",
                    help="where to write the held-out validation text sample ('' to skip)")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--intermediate-size", type=int, default=352)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--num-kv-heads", type=int, default=2)
    ap.add_argument("--max-position-embeddings", type=int, default=512)
    ap.add_argument("--train-mb", type=float, default=6.0, help="MB of stdlib source used for training")
    ap.add_argument("--eval-mb", type=float, default=0.5, help="MB of held-out stdlib source for evaluation")
    ap.add_argument("--holdout-every", type=int, default=10, help="every N-th sorted file is held out")
    ap.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens scored at the end")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    out = Path(args.out)
    if not out.is_absolute():
        out = REPO_ROOT / out
    out.mkdir(parents=True, exist_ok=True)

    # ---- data -----------------------------------------------------------
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = list_stdlib_files(stdlib)
    train, heldout, n_train, n_eval = split_files(
        files, args.holdout_every, int(args.train_mb * 1e6), int(args.eval_mb * 1e6)
    )
    print(f"stdlib: {stdlib} ({len(files)} candidate files)")
    print(f"train: {len(train)} files, {n_train/1e6:.2f} MB "
          f"({train[0][0].relative_to(stdlib)} .. {train[-1][0].relative_to(stdlib)})")
    print(f"held-out: {len(heldout)} files, {n_eval/1e6:.2f} MB")
    train_names = {p for p, _ in train}
    assert not train_names & {p for p, _ in heldout}

    if args.sample_out:
        sample_path = Path(args.sample_out)
        if not sample_path.is_absolute():
            sample_path = REPO_ROOT / sample_path
        sample_path.parent.mkdir(parents=True, exist_ok=True)
        sample = make_sample(heldout, stdlib)
        sample_path.write_text(sample, encoding="utf-8")
        print(f"wrote {sample_path} ({len(sample.encode('utf-8'))} bytes)")

    # ---- tokenizer ------------------------------------------------------
    t0 = time.time()
    train_texts = [t for _, t in train]
    train_tokenizer(train_texts, args.vocab_size, out)
    tok = AutoTokenizer.from_pretrained(str(out))  # verify it round-trips from disk
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert isinstance(PreTrainedTokenizerFast.from_pretrained(str(out)), PreTrainedTokenizerFast)
    probe = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok(probe, add_special_tokens=False)["input_ids"]) == probe
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    print(f"tokenizer: {type(tok).__name__} vocab={len(tok)} bos={tok.bos_token_id} "
          f"eos={tok.eos_token_id} pad={tok.pad_token_id} ({time.time()-t0:.1f}s)")

    train_ids = encode_docs(tok, train_texts)
    eval_ids = encode_docs(tok, [t for _, t in heldout])
    print(f"train tokens: {len(train_ids)} ({n_train/len(train_ids):.2f} bytes/token), "
          f"held-out tokens: {len(eval_ids)}")

    # ---- model ----------------------------------------------------------
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
        torch_dtype="float32",
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    gen = torch.Generator().manual_seed(args.seed)
    max_start = len(train_ids) - args.seq_len - 1
    t_train = time.time()
    running = None
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.warmup, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, max_start, (args.batch_size,), generator=gen)
        x = torch.stack([train_ids[s : s + args.seq_len] for s in starts.tolist()])
        y = torch.stack([train_ids[s + 1 : s + args.seq_len + 1] for s in starts.tolist()])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  ema {running:.4f}  lr {lr:.2e}  "
                  f"{time.time()-t_train:6.1f}s", flush=True)
    train_time = time.time() - t_train
    final_train = eval_loss(model, train_ids, args.seq_len, 32, args.eval_tokens)
    final_eval = eval_loss(model, eval_ids, args.seq_len, 32, args.eval_tokens)
    print(f"training took {train_time:.1f}s")
    print(f"final train loss {final_train:.4f}  held-out loss {final_eval:.4f} nats/token "
          f"(ln V = {math.log(len(tok)):.3f})")

    # ---- save -----------------------------------------------------------
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.save_pretrained(str(out), safe_serialization=True)

    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    check = eval_loss(reloaded, eval_ids, args.seq_len, 32, 4096)
    ref = eval_loss(model, eval_ids, args.seq_len, 32, 4096)
    assert abs(check - ref) < 1e-4, (check, ref)

    regen = "python scripts/train_demo_model.py"
    defaults = ap.parse_args([])
    # --threads / --log-every do not change the result (1 and 2 threads give
    # bit-identical checkpoints), so they are left out of the command.
    extra = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
             if getattr(defaults, k) != v and k not in ("threads", "log_every")]
    if extra:
        regen += " " + " ".join(extra)
    stats = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "n_params": n_params,
        "train_files": len(train),
        "train_bytes": n_train,
        "train_tokens": len(train_ids),
        "heldout_files": len(heldout),
        "heldout_bytes": n_eval,
        "heldout_tokens": len(eval_ids),
        "final_train_loss": round(final_train, 4),
        "final_heldout_loss": round(final_eval, 4),
        "train_seconds": round(train_time, 1),
        "args": vars(args),
    }
    write_readme(out, args, config, stats, regen)
    print(json.dumps({k: v for k, v in stats.items() if k != "args"}))
    for f in sorted(out.iterdir()):
        print(f"  {f.name:28s} {f.stat().st_size:>10,d} bytes")


def write_readme(out: Path, args, config, s, regen):
    text = f"""# demo-llama

A tiny Llama-architecture causal LM (`LlamaForCausalLM`, {s['n_params']:,} parameters,
float32, `model.safetensors`) used as the demo / test checkpoint for `surgery`.
It is a toy: it has learned some surface statistics of Python source code and
nothing more. Do not use it for anything except exercising tooling.

## Architecture

| field | value |
|---|---|
| vocab_size | {config.vocab_size} (byte-level BPE) |
| hidden_size | {config.hidden_size} |
| intermediate_size | {config.intermediate_size} |
| num_hidden_layers | {config.num_hidden_layers} |
| num_attention_heads / num_key_value_heads | {config.num_attention_heads} / {config.num_key_value_heads} (GQA) |
| max_position_embeddings | {config.max_position_embeddings} |
| tie_word_embeddings | {config.tie_word_embeddings} |
| bos / eos / pad ids | {config.bos_token_id} / {config.eos_token_id} / {config.pad_token_id} (`<s>`, `</s>`, `<pad>`; `<unk>` = 2) |

## How it was made

`scripts/train_demo_model.py`, fully offline and seeded (seed {args.seed}):

* **Data**: the Python {s['python']} standard library's own `*.py` sources,
  sorted by path, skipping test suites, `idlelib`, `lib2to3`, `encodings`,
  `pydoc_data` and similar. Every {args.holdout_every}th file is held out. Training
  used {s['train_files']} files ({s['train_bytes']/1e6:.2f} MB, {s['train_tokens']:,} tokens);
  evaluation used {s['heldout_files']} held-out files ({s['heldout_bytes']/1e6:.2f} MB).
* **Tokenizer**: byte-level BPE trained with `tokenizers` on the training text
  only; a `<s>` is prepended to each encoded sequence.
* **Training**: {args.steps} steps of AdamW (lr {args.lr:g}, {args.warmup} warmup steps, cosine
  to 10%, weight decay {args.weight_decay:g}), batch {args.batch_size} x {args.seq_len} tokens, on CPU
  with torch {s['torch']}; {args.threads} thread(s), {s['train_seconds']:.0f} s of training wall time
  (about 4.5 min with 2 threads on an otherwise idle 2-core machine).

## Results

| | loss (nats/token) |
|---|---|
| train (first {args.eval_tokens:,} tokens) | {s['final_train_loss']:.4f} |
| held-out stdlib files (first {args.eval_tokens:,} tokens) | {s['final_heldout_loss']:.4f} |
| uniform baseline ln({config.vocab_size}) | {math.log(config.vocab_size):.4f} |

`surgery/data/sample.txt` is ~30 KB of held-out source written by the same script.

## Regenerate

From the repository root:

```
{regen}
```

Exact bytes depend on the Python version (its stdlib is the corpus) and on the
torch build; the architecture and approximate loss do not.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
