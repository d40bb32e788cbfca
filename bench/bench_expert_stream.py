"""`surgery validate --stream` of an MoE whose layers are mostly experts: experts read one at a time against the
same command at a commit that read each layer whole.

    python bench/bench_expert_stream.py --workdir /tmp/es          # 16 experts, 4 layers, ~2.5 GB float32
    python bench/bench_expert_stream.py --experts 8 --baseline 0c49ec4

The model: a random Llama (hidden 1024, FFN 2816, vocab 32000) upcycled to --experts experts (top-2), so
each MoE layer holds --experts x 35 MB of float32 experts. Rows: the baseline commit (a git worktree of it,
same Python, same inputs), this checkout with the default memory budget, and this checkout with
--memory-budget LOW (hidden states spilled, one expert at a time). Each row's loss must equal the
baseline's: reading experts one at a time is bit-identical on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, llama_config, make_random_llama, markdown_table, save_word_tokenizer, warm


def words(path: Path, vocab: int, count: int, seed: int = 1) -> Path:
    import random

    generator = random.Random(seed)
    path.write_text(" ".join(f"w{generator.randrange(3, vocab)}" for _ in range(count)) + "\n")
    return path


def timed_json(command: list[str], env: dict) -> tuple[float, float, dict]:
    """(wall seconds, peak RSS MiB, the JSON report on stdout) of a command, under /usr/bin/time -v. It runs in
    env's PYTHONPATH: `python -m` puts the working directory first on sys.path, so run from a checkout it would
    import that checkout's code whatever PYTHONPATH says."""
    import re
    import time

    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True,
                            env={**os.environ, **env}, cwd=env["PYTHONPATH"])
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)) / 1024
    return wall, rss, json.loads(result.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed)")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096, help="validation tokens")
    parser.add_argument("--low-budget", default="200MB")
    parser.add_argument("--baseline", default="0c49ec4", help="commit whose runner read every layer whole")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-expert-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        config = llama_config(1024, 2816, args.layers, 32000, heads=16, kv_heads=16)
        dense = work / "dense"
        if not (dense / "config.json").exists() or json.loads((dense / "config.json").read_text()) != config:
            make_random_llama(dense, config, shard_bytes=10**9, seed=0)
            save_word_tokenizer(dense, config["vocab_size"])
        moe = work / f"moe-{args.experts}"
        if not (moe / "config.json").exists():
            subprocess.run([sys.executable, "-m", "surgery", "upcycle", str(dense), str(moe), "-n", str(args.experts),
                            "-k", "2", "--max-shard-size", "1GB", "--force"], check=True, stdout=subprocess.DEVNULL)
        warm(moe)
        text = words(work / "text.txt", config["vocab_size"], args.tokens)
        baseline = work / "baseline"
        if not baseline.exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline), args.baseline],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        validate = ["-m", "surgery", "validate", str(moe), "--data", str(text), "--stream", "--device", "cpu",
                    "--max-tokens", str(args.tokens), "--json"]
        runs = {
            f"commit {args.baseline}: every layer read whole": ([sys.executable, *validate], str(baseline)),
            "experts one at a time (default budget)": ([sys.executable, *validate], str(REPO)),
            f"experts one at a time, --memory-budget {args.low_budget}": (
                [sys.executable, *validate, "--memory-budget", args.low_budget], str(REPO)),
        }
        results = {label: [] for label in runs}
        losses = {}
        for _ in range(args.repeat):
            for label, (command, path) in runs.items():
                env = {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
                wall, rss, report = timed_json(command, env)
                results[label].append((wall, rss))
                losses[label] = report["loss"]
                print(f"  {label}: {wall:.1f} s, {rss:.0f} MiB, loss {losses[label]!r}", file=sys.stderr, flush=True)
        size = sum(p.stat().st_size for p in moe.glob("*.safetensors"))
        base_label = next(iter(runs))
        base_wall, base_rss = min(r[0] for r in results[base_label]), max(r[1] for r in results[base_label])
        rows = []
        for label, measured in results.items():
            wall, rss = min(r[0] for r in measured), max(r[1] for r in measured)
            rows.append([label, f"{wall:.1f}", f"{rss:.0f}", f"{wall / base_wall:.2f} / {rss / base_rss:.2f}",
                         "yes" if losses[label] == losses[base_label] else f"no ({losses[label]!r})"])
        print(f"## validate --stream of a {args.experts}-expert MoE ({args.layers} layers, {size / 1e9:.2f} GB float32, "
              f"{args.tokens} tokens)\n")
        print(markdown_table(["run", "wall s", "peak RSS MiB", "vs baseline (wall / RSS)", "loss equal"], rows))
        print(f"\nBest wall / worst RSS of {args.repeat}; `/usr/bin/time -v`; warm page cache.")
    finally:
        if (work / "baseline").exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "baseline")],
                           check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
