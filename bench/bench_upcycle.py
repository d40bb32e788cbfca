"""`surgery upcycle` to 8 experts against the I/O floor, with peak RSS, and mergekit-moe as a peer.

    python bench/bench_upcycle.py            # ~1.1 GB fp32 Llama -> ~4 GB Mixtral, 200MB and 5GB shards
    python bench/bench_upcycle.py --quick    # ~160 MB -> ~650 MB, one run per row, no mergekit

Measured in one run, warm page cache, best of --repeat:
- I/O floor: read every input file once and write the output's number of bytes with plain file I/O;
- `surgery upcycle SRC OUT --num-experts 8 --top-k 2` as a subprocess under /usr/bin/time -v, at two
  shard sizes: wall time and peak RSS;
- mergekit-moe doing the same upcycle (8 copies of SRC, random gates), when its executable exists
  (a separate virtualenv: python -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit).
Targets (issue 4): throughput >= 0.7 of the floor's; peak RSS minus the baseline of a process that only
imports the same modules <= 2x the largest tensor, whatever the shard size.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (REPO, dir_bytes, io_floor, llama_config, make_random_llama, markdown_table,
                    surgery_command, timed, warm)

EXPERTS, TOP_K = 8, 2
SURGERY_IMPORTS = "import numpy, safetensors, click, rich, surgery.writer.stream, surgery.upcycle, surgery.plan.moe"  # no torch: copies and numpy router init
MERGEKIT_IMPORTS = "import torch, transformers, mergekit.scripts.moe"


def planned_output_bytes(source: Path) -> int:
    sys.path.insert(0, str(REPO))
    from surgery.upcycle import build_plan

    plan = build_plan(source, EXPERTS, TOP_K)
    try:
        return plan.total_bytes
    finally:
        plan.sources[0].close()


def largest_tensor_bytes(source: Path) -> int:
    sys.path.insert(0, str(REPO))
    from surgery.io.checkpoint import Checkpoint

    with Checkpoint.open(source) as checkpoint:
        return max(info.nbytes for info in checkpoint.tensors.values())


def add_tokenizer(directory: Path) -> None:
    """A tiny word-level tokenizer: mergekit-moe refuses a model directory without one."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def startup(imports: str, python: str = sys.executable, repeat: int = 2) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of a process that only imports what the tool imports: its fixed cost."""
    runs = [timed([python, "-c", imports]) for _ in range(repeat)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def mergekit_config(source: Path, path: Path) -> Path:
    experts = "".join(f"  - source_model: {source}\n    positive_prompts: [\"expert {i}\"]\n" for i in range(EXPERTS))
    path.write_text(f"base_model: {source}\ngate_mode: random\ndtype: float32\nexperts_per_token: {TOP_K}\n"
                    f"experts:\n{experts}")
    return path


def mergekit_row(executable: Path, source: Path, work: Path, repeat: int, floor: float, output_bytes: int,
                 limit: int) -> list:
    name = "mergekit-moe (gate_mode random, 5B shards)"
    if not executable.exists():
        return [name, "skipped", "", "", "", "", "", f"not installed at {executable} (see the module doc)"]
    base = startup(MERGEKIT_IMPORTS, str(executable.parent / "python"), repeat)
    config = mergekit_config(source, work / "mergekit.yml")
    runs = []
    for _ in range(repeat):
        out = work / "out-mergekit"
        try:
            runs.append(timed([str(executable), str(config), str(out), "--i-understand-this-is-not-useful-without-training",
                               "--quiet", "--no-write-model-card", "--no-copy-tokenizer"]))
        except RuntimeError as exc:
            shutil.rmtree(out, ignore_errors=True)
            return [name, "failed", "", "", "", "", "", str(exc).splitlines()[-1][:120]]
        shutil.rmtree(out, ignore_errors=True)
    return _row(name, runs, floor, output_bytes, base, limit)


def _row(name: str, runs, floor: float, output_bytes: int, base: tuple[float, float], limit: int) -> list:
    """wall, throughput vs the floor with and without the process's fixed start-up cost, RSS above baseline."""
    wall = min(r[0] for r in runs)
    rss = max(r[1] for r in runs)
    work = max(wall - base[0], 1e-9)
    above = rss - base[1]
    verdict = f"{'yes' if floor / wall >= 0.7 else 'no'} / {'yes' if above * 2**20 <= limit else 'no'}"
    return [name, f"{wall:.2f}", f"{output_bytes / wall / 1e6:.0f}", f"{floor / wall:.2f}", f"{floor / work:.2f}",
            f"{rss:.0f}", f"{above:.0f}", verdict]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~160 MB model (runs in well under a minute)")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per row, best kept (default 1 quick, 2 full)")
    parser.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-moe", help="mergekit-moe executable")
    args = parser.parse_args()
    repeat = args.repeat or (1 if args.quick else 2)
    work = Path(tempfile.mkdtemp(prefix="bench-upcycle-", dir=args.workdir))
    try:
        config = llama_config(1024, 2816, 2, 8000) if args.quick else llama_config(2048, 5632, 3, 32000)
        source = make_random_llama(work / "src", config, shard_bytes=400 * 10**6)
        add_tokenizer(source)
        size = dir_bytes(source)
        output_bytes = planned_output_bytes(source)
        free = shutil.disk_usage(work).free
        if free < 2.5 * output_bytes:
            raise SystemExit(f"not enough free disk in {work}: {free / 1e9:.1f} GB free, need about "
                             f"{2.5 * output_bytes / 1e9:.1f} GB (one output and the floor's file); use --workdir")
        largest = largest_tensor_bytes(source)
        limit = 2 * largest
        warm(source)
        inputs = sorted(source.glob("*.safetensors"))
        floor = min(io_floor(inputs, output_bytes, work / "floor") for _ in range(repeat))
        base = startup(SURGERY_IMPORTS, repeat=repeat)
        rows = [["I/O floor (read input once, write output bytes once)", f"{floor:.2f}",
                 f"{output_bytes / floor / 1e6:.0f}", "1.00", "1.00", "", "", ""]]
        for shard in ("200MB", "5GB"):
            runs = []
            for _ in range(repeat):
                out = work / f"out-{shard}"
                runs.append(timed(surgery_command("upcycle", source, out, "--num-experts", EXPERTS, "--top-k", TOP_K,
                                                  "--max-shard-size", shard)))
                shutil.rmtree(out)
            rows.append(_row(f"surgery upcycle -n {EXPERTS} -k {TOP_K}, {shard} shards", runs, floor, output_bytes,
                             base, limit))
        if args.quick:
            rows.append(["mergekit-moe", "skipped", "", "", "", "", "", "not run with --quick (it takes ~30 s)"])
        else:
            rows.append(mergekit_row(Path(args.mergekit), source, work, repeat, floor, output_bytes, limit))
        print(f"\nsource: {size / 1e9:.2f} GB fp32 Llama (hidden {config['hidden_size']}, ffn "
              f"{config['intermediate_size']}, {config['num_hidden_layers']} layers, {len(inputs)} shards) -> "
              f"{output_bytes / 1e9:.2f} GB Mixtral with {EXPERTS} experts; largest tensor {largest / 2**20:.0f} MiB, "
              f"RSS limit 2x = {limit / 2**20:.0f} MiB above baseline; surgery start-up (imports only) {base[0]:.1f} s, "
              f"{base[1]:.0f} MiB; best of {repeat}, warm page cache\n")
        print(markdown_table(["run", "wall s", "output MB/s", "vs floor (>= 0.7)", "vs floor, start-up excluded",
                              "peak RSS MiB", "RSS above start-up MiB", "targets met (speed / RSS)"], rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"benchmark command failed: {exc}") from None
