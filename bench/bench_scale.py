"""Peak RSS of `surgery copy` and `surgery upcycle` at two model sizes: memory must not grow with the model.

    python bench/bench_scale.py            # ~1 GB and ~10 GB fp32 Llama (TinyLlama shapes), a few minutes
    python bench/bench_scale.py --quick    # ~0.2 GB and ~1 GB fp32 Llama (smaller shapes), well under a minute
    python bench/bench_scale.py --sizes 1,5,10 --workdir /big/disk
    python bench/bench_scale.py --malloc-mmap-threshold 1048576   # diagnosis: glibc's fixed mmap threshold

For each size a synthetic fp32 Llama checkpoint is generated quickly (one seeded 4 MiB block of
N(0, 0.02) values, written at a rotating offset into every matrix; norms are ones; 2 GB input
shards with an index), then `surgery copy SRC OUT` and `surgery upcycle SRC OUT -n 2 -k 1` run as
subprocesses under /usr/bin/time -v; each output is deleted right after it is measured and the
checkpoint right after its size is done. Only the number of layers changes with the size: hidden,
intermediate and vocabulary sizes, hence every tensor's shape and the largest tensor, are the same
at every size, so peak RSS should depend on the largest tensor and not on the model's size.

Target (scale requirement): the peak RSS of each command on the largest checkpoint is within 10 %
of its peak RSS on the smallest one. Needs free disk in --workdir for the largest checkpoint plus
its upcycled output (~2.7x the largest size); checked before anything is generated.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from common import (INPUT_SHARD_BYTES, REPO, dir_bytes, layout, make_synthetic_llama, markdown_table, sized_config,
                    surgery_command, tensor_bytes, timed)

EXPERTS, TOP_K = 2, 1
TOLERANCE = 0.10
# (hidden, intermediate, vocab): full runs use TinyLlama-1.1B's matrix shapes; --quick smaller ones so
# that 0.2 GB still holds a few layers.
SHAPES = {"full": (2048, 5632, 32000), "quick": (1024, 2816, 8000)}
COPY_IMPORTS = "import numpy, safetensors, click, rich, surgery.cli, surgery.copy, surgery.writer.stream"
UPCYCLE_IMPORTS = ("import torch, numpy, safetensors, click, rich, surgery.cli, surgery.writer.stream, surgery.upcycle, "
                   "surgery.plan.moe")
DISK_MARGIN = 2 * 10**9


def upcycled_bytes(config: dict) -> int:
    """Bytes of the upcycled checkpoint: each FFN written EXPERTS times, plus fp32 routers."""
    entries = layout(config)
    ffn = sum(tensor_bytes(e) for e in entries if e.group == "ffn")
    return (sum(tensor_bytes(e) for e in entries) + (EXPERTS - 1) * ffn
            + 4 * EXPERTS * config["hidden_size"] * config["num_hidden_layers"])


def check_disk(work: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"not enough free disk in {work} for {what}: {free / 1e9:.1f} GB free, need about "
                         f"{need / 1e9:.1f} GB; free some space, pass smaller --sizes or another --workdir")


def machine_facts() -> str:
    memory = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {memory} RAM; Python "
            f"{platform.python_version()}, torch {torch_version}")


def _git_head() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def run_command(kind: str, source: Path, work: Path, repeat: int, env: dict | None = None):
    """(wall s best, peak RSS MiB worst, output bytes) of one command on `source`; the output is deleted."""
    out = work / f"out-{kind}"
    extra = ["--num-experts", EXPERTS, "--top-k", TOP_K] if kind == "upcycle" else []
    runs, output = [], 0
    for _ in range(repeat):
        try:
            runs.append(timed(surgery_command(kind, source, out, *extra), env=env))
            output = dir_bytes(out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return min(r[0] for r in runs), max(r[1] for r in runs), output


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="checkpoint sizes in GB, comma-separated (default 1,10; "
                                                      "--quick: 0.2,1)")
    parser.add_argument("--quick", action="store_true", help="0.2 and 1 GB with smaller tensor shapes")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir in /tmp); "
                                                        "removed at the end, generated checkpoints included")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs per command and size, best wall and worst peak RSS kept (default 2; --quick 1)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run the commands with MALLOC_MMAP_THRESHOLD_=BYTES (glibc: a fixed threshold, so "
                             "freed large buffers go back to the system instead of staying in the heap)")
    parser.add_argument("--keep-going", action="store_true", help="record a failed run and go on")
    args = parser.parse_args()
    args.repeat = args.repeat or (1 if args.quick else 2)
    env = None if args.malloc_mmap_threshold is None else {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)}
    sizes = sorted(float(s) for s in (args.sizes or ("0.2,1" if args.quick else "1,10")).split(","))
    shape = SHAPES["quick" if args.quick else "full"]
    configs = [sized_config(size * 1e9, shape) for size in sizes]
    command_line = " ".join(["python3", "bench/bench_scale.py", *map(shlex.quote, sys.argv[1:])])
    parent = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    # The largest size at its peak holds its checkpoint and one output (the upcycled one is the larger).
    need = max(sum(tensor_bytes(e) for e in layout(c)) + upcycled_bytes(c) for c in configs) + DISK_MARGIN
    check_disk(parent, need, "the largest checkpoint and its upcycled output")
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=parent))
    rows, results = [], {}
    try:
        base = {kind: timed([sys.executable, "-c", imports], env=env)[1]
                for kind, imports in (("copy", COPY_IMPORTS), ("upcycle", UPCYCLE_IMPORTS))}
        first = layout(configs[0])
        largest = max(first, key=tensor_bytes)
        for size, config in zip(sizes, configs):
            entries = layout(config)
            input_bytes = sum(tensor_bytes(e) for e in entries)
            check_disk(work, input_bytes + upcycled_bytes(config) + DISK_MARGIN, f"the {size:g} GB run")
            started = time.perf_counter()
            source = make_synthetic_llama(work / f"src-{size:g}GB", config)
            generated = time.perf_counter() - started
            on_disk = dir_bytes(source)
            shards = len(list(source.glob("*.safetensors")))
            print(f"generated {size:g} GB target: {on_disk / 1e9:.2f} GB, {config['num_hidden_layers']} layers, "
                  f"{len(entries)} tensors in {shards} shard(s), {generated:.1f} s", file=sys.stderr, flush=True)
            for kind in ("copy", "upcycle"):
                label = f"surgery {kind}" + (f" -n {EXPERTS} -k {TOP_K}" if kind == "upcycle" else "")
                try:
                    wall, rss, output = run_command(kind, source, work, args.repeat, env)
                except RuntimeError as exc:
                    if not args.keep_going:
                        raise
                    rows.append([label, f"{size:g}", f"{on_disk / 1e9:.2f}", config["num_hidden_layers"], "failed",
                                 "", "", "", "", str(exc).splitlines()[0][:100]])
                    continue
                results[(kind, size)] = rss
                print(f"  {label}: {wall:.1f} s, peak RSS {rss:.0f} MiB", file=sys.stderr, flush=True)
                rows.append([label, f"{size:g}", f"{on_disk / 1e9:.2f}", config["num_hidden_layers"],
                             f"{output / 1e9:.2f}", f"{wall:.1f}", f"{on_disk / wall / 1e6:.0f}",
                             f"{output / wall / 1e6:.0f}", f"{rss:.0f}", f"{rss - base[kind]:.0f}"])
            shutil.rmtree(source)
        hidden, ffn, vocab = shape
        print(f"\n{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {machine_facts()}")
        commit = _git_head()
        print(f"command: `{command_line}`" + (f" at commit {commit}" if commit else "")
              + (f"; environment MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}" if env else "") + "\n")
        print(f"Synthetic fp32 Llama checkpoints (hidden {hidden}, intermediate {ffn}, vocab {vocab}, 16 heads, "
              f"8 KV heads; only the layer count changes with the size, so every tensor has the same shape at "
              f"every size); largest tensor {largest.name} {list(largest.shape)} = "
              f"{tensor_bytes(largest) / 2**20:.0f} MiB at every size; input shards of "
              f"{INPUT_SHARD_BYTES / 1e9:g} GB, outputs in the tool's default 5GB shards. Values: one seeded 4 MiB "
              f"block of N(0, 0.02) reused at rotating offsets, norms ones. "
              f"{'One run per row' if args.repeat == 1 else f'{args.repeat} runs per row: best wall, worst peak RSS'}"
              f"; page cache as left by "
              f"the generator. Baseline = peak RSS of a python that only imports what the command imports: "
              f"copy {base['copy']:.0f} MiB, upcycle {base['upcycle']:.0f} MiB.\n")
        print(markdown_table(["run", "size target GB", "input GB", "layers", "output GB", "wall s", "input MB/s",
                              "output MB/s", "peak RSS MiB", "RSS above baseline MiB"], rows))
        print()
        small, big = sizes[0], sizes[-1]
        failed = False
        for kind in ("copy", "upcycle"):
            if (kind, small) not in results or (kind, big) not in results:
                print(f"- {kind}: FAIL (a run failed; no comparison)")
                failed = True
                continue
            a, b = results[(kind, small)], results[(kind, big)]
            ratio = b / a
            ok = abs(ratio - 1) <= TOLERANCE
            failed |= not ok
            print(f"- {kind}: {'PASS' if ok else 'FAIL'}: peak RSS {b:.0f} MiB at {big:g} GB vs {a:.0f} MiB at "
                  f"{small:g} GB, ratio {ratio:.3f} (target within {TOLERANCE:.0%}); above baseline "
                  f"{b - base[kind]:.0f} vs {a - base[kind]:.0f} MiB")
        if failed:
            sys.exit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
