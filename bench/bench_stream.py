"""Model-running commands at two model sizes: peak RSS must not grow with the model (layer-by-layer execution).

    python bench/bench_stream.py                 # synthetic fp32 Llamas of ~1 GB and ~8 GB (same tensor shapes)
    python bench/bench_stream.py --quick         # ~0.25 GB and ~1 GB, smaller shapes
    python bench/bench_stream.py --llama7b       # one Llama-2-7B-shaped bf16 checkpoint (13.5 GB): every command once
    python bench/bench_stream.py --llama7b --merges-only   # only the merges: --non-ffn regmean and regmean++
    python bench/bench_stream.py --workdir /big/disk --tokens 512

Every command that runs the model, as a subprocess under /usr/bin/time -v:

* ``upcycle -n 4 -k 2 --router-init calibrated`` (routers fitted on the calibration tokens);
* ``upcycle -n 4 -k 2 --verify`` (the output compared with the source layer by layer);
* ``split -n 8 -k 2 --strategy random --router-init calibrated`` and ``--strategy coactivation``;
* ``merge`` of two such models with ``--router-init calibrated``, ``--non-ffn average`` and ``regmean++``;
* ``validate OUT --reference SRC --stream`` (loss, KL, top-1 and routing of the upcycled model).

Checkpoints are synthetic (``common.make_synthetic_llama``: one seeded block of random values
reused at rotating offsets), with a word-level tokenizer so that merge reads calibration text;
the other commands read random token ids. Only the layer count changes between the two sizes, so
every tensor has the same shape: peak RSS should depend on one layer, the embedding and the
calibration hidden states, not on the depth. Target: the large run's peak RSS within 10 % of the
small run's, for every command. --llama7b instead checks that each command completes on a
Llama-2-7B-shaped bf16 checkpoint with peak RSS <= 4 GiB, and reports wall time and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import (dir_bytes, layout, llama_config, make_synthetic_llama, markdown_table, save_word_tokenizer,
                    sized_config, surgery_command, tensor_bytes, timed)

TOLERANCE = 0.10
LIMIT_7B = 4 * 2**30
SHAPES = {"full": (2048, 5632, 32000), "quick": (1024, 2816, 8000)}


def calibration_files(work: Path, vocab: int, tokens: int) -> dict:
    """Random token ids (.jsonl rows of 256) and random words (text for merge), seeded."""
    generator = random.Random(0)
    ids = [[generator.randrange(3, vocab) for _ in range(256)] for _ in range(-(-tokens // 256))]
    (work / "ids.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ids))
    for name in ("a", "b"):
        (work / f"{name}.txt").write_text(" ".join(f"w{generator.randrange(3, vocab)}" for _ in range(2 * tokens)))
    return {"ids": work / "ids.jsonl", "a": work / "a.txt", "b": work / "b.txt"}


def commands(source: Path, work: Path, files: dict, tokens: int) -> list[tuple[str, list, Path | None]]:
    """(label, surgery arguments, output directory to delete after the run) of every command on one model, in
    order; the upcycled output is validated by the next command, then deleted."""
    calibration = ["--calibration", files["ids"], "--calibration-tokens", tokens, "--device", "cpu"]
    upcycled = work / "upcycled"
    return [
        ("upcycle -n 4 -k 2 --router-init calibrated",
         ["upcycle", source, upcycled, "-n", 4, "-k", 2, "--router-init", "calibrated", *calibration], None),
        ("validate UPCYCLED -r SRC --stream",
         ["validate", upcycled, "-r", source, "--tokens", files["ids"], "--max-tokens", tokens, "--stream", "--json",
          "--device", "cpu"], upcycled),
        ("upcycle -n 4 -k 2 --verify",
         ["upcycle", source, work / "verified", "-n", 4, "-k", 2, "--verify", "--verify-tokens", tokens,
          "--device", "cpu"], work / "verified"),
        ("split -n 8 -k 2 --strategy random --router-init calibrated",
         ["split", source, work / "split", "-n", 8, "-k", 2, "--strategy", "random", "--router-init", "calibrated",
          *calibration], work / "split"),
        ("split -n 8 -k 2 --strategy coactivation",
         ["split", source, work / "split", "-n", 8, "-k", 2, "--strategy", "coactivation", *calibration], work / "split"),
    ]


def merge_command(source: Path, second: Path, work: Path, files: dict, tokens: int,
                  non_ffn: str = "average") -> tuple[str, list, Path]:
    return (f"merge of 2 models --router-init calibrated --non-ffn {non_ffn}",
            ["merge", work / "merged", "--expert", f"a={source}", "--expert", f"b={second}", "--calibration",
             f"a={files['a']}", "--calibration", f"b={files['b']}", "--router-init", "calibrated", "--non-ffn",
             non_ffn, "--calibration-tokens", tokens, "--device", "cpu"], work / "merged")


def run(label: str, arguments: list, out: Path | None) -> dict:
    written_to = arguments[2] if arguments[0] in ("upcycle", "split") else arguments[1] if arguments[0] == "merge" else None
    wall, rss, _ = timed([str(a) for a in surgery_command(*arguments)])
    written = dir_bytes(written_to) if written_to is not None and Path(written_to).exists() else 0
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    print(f"  {label}: {wall:.1f} s, peak RSS {rss:.0f} MiB", file=sys.stderr, flush=True)
    return {"wall": wall, "rss": rss, "written": written}


def model_of(work: Path, name: str, config: dict, dtype: str, seed: int) -> Path:
    started = time.perf_counter()
    directory = make_synthetic_llama(work / name, config, seed=seed, dtype=dtype)
    save_word_tokenizer(directory, config["vocab_size"])
    print(f"generated {name}: {dir_bytes(directory) / 1e9:.2f} GB, {config['num_hidden_layers']} layers "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return directory


def series(work: Path, name: str, config: dict, dtype: str, tokens: int, merges=("average", "regmean++"),
           others: bool = True) -> dict:
    """Every command on one model size (`others`: besides the merges, one per `--non-ffn` in `merges`); returns
    label -> measurement. The second model (merge) is generated only when the other outputs are gone, so the
    disk holds at most two models and one output."""
    files = calibration_files(work, config["vocab_size"], tokens)
    source = model_of(work, f"{name}-a", config, dtype, 0)
    results, second = {}, None
    try:
        for label, arguments, out in commands(source, work, files, tokens) if others else ():
            results[label] = run(label, arguments, out)
        second = model_of(work, f"{name}-b", config, dtype, 1)
        for non_ffn in merges:
            label, arguments, out = merge_command(source, second, work, files, tokens, non_ffn)
            results[label] = run(label, arguments, out)
    finally:
        for directory in (source, second, work / "upcycled", work / "verified", work / "split", work / "merged"):
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
    return results


def scale(args, work: Path) -> None:
    shape = SHAPES["quick" if args.quick else "full"]
    sizes = (0.25, 1.0) if args.quick else (1.0, 8.0)
    runs = {}
    for size in sizes:
        config = sized_config(size * 1e9, shape)
        print(f"size {size:g} GB: {config['num_hidden_layers']} layers", file=sys.stderr, flush=True)
        runs[size] = (config, series(work, f"{size:g}GB", config, "F32", args.tokens))
    small, big = sizes
    rows, verdicts = [], []
    for label in runs[small][1]:
        a, b = runs[small][1][label]["rss"], runs[big][1][label]["rss"]
        for size in sizes:
            config, measured = runs[size]
            rows.append([label, f"{size:g}", config["num_hidden_layers"], f"{measured[label]['wall']:.1f}",
                         f"{measured[label]['rss']:.0f}"])
        ratio = b / a
        verdicts.append(f"- {'PASS' if abs(ratio - 1) <= TOLERANCE else 'FAIL'}: {label}: peak RSS {b:.0f} MiB at "
                        f"{big:g} GB vs {a:.0f} MiB at {small:g} GB (ratio {ratio:.3f})")
    hidden, ffn, vocab = shape
    entries = layout(runs[small][0])
    layer_bytes = sum(tensor_bytes(e) for e in entries if e.layer == 0)
    embed = next(e for e in entries if e.group == "embedding")
    print(f"Synthetic fp32 Llamas (hidden {hidden}, intermediate {ffn}, vocab {vocab}); one decoder layer "
          f"{layer_bytes / 2**20:.0f} MiB and the embedding {tensor_bytes(embed) / 2**20:.0f} MiB in float32 at every "
          f"size; {args.tokens} calibration tokens; hidden states of the token set "
          f"{args.tokens * hidden * 4 / 2**20:.0f} MiB.\n")
    print(markdown_table(["command", "model GB", "layers", "wall s", "peak RSS MiB"], rows))
    print("\n" + "\n".join(verdicts))


def llama7b(args, work: Path) -> None:
    config = llama_config(4096, 11008, 32, 32000, heads=32, kv_heads=32, max_positions=4096)
    merges = ("regmean", "regmean++") if args.merges_only else ("average", "regmean++")
    measured = series(work, "llama7b", config, "BF16", args.tokens, merges=merges, others=not args.merges_only)
    rows = []
    for label, result in measured.items():
        rows.append([label, f"{result['wall']:.0f}", f"{args.tokens / result['wall']:.1f}", f"{result['rss']:.0f}",
                     f"{result['written'] / 1e9:.1f}", "PASS" if result["rss"] * 2**20 <= LIMIT_7B else "FAIL"])
    print(f"Llama-2-7B-shaped bf16 checkpoints (hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000; "
          f"13.5 GB each), {args.tokens} calibration tokens; tokens/s = calibration tokens / wall time of the whole "
          f"command (reading, running, writing).\n")
    print(markdown_table(["command", "wall s", "tokens/s", "peak RSS MiB", "written GB", "<= 4 GiB"], rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.25 and 1 GB with smaller shapes")
    parser.add_argument("--llama7b", action="store_true", help="one Llama-2-7B-shaped bf16 series instead")
    parser.add_argument("--merges-only", action="store_true",
                        help="with --llama7b: only the merges, with --non-ffn regmean and regmean++")
    parser.add_argument("--tokens", type=int, default=None, help="calibration tokens (default 1024; --llama7b 256)")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed)")
    args = parser.parse_args()
    args.tokens = args.tokens or (256 if args.llama7b else 1024)
    print("command: `python3 bench/bench_stream.py " + " ".join(map(shlex.quote, sys.argv[1:])) + "`\n")
    work = Path(tempfile.mkdtemp(prefix="bench-stream-", dir=args.workdir))
    try:
        (llama7b if args.llama7b else scale)(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
