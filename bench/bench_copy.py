"""`surgery copy` against the I/O floor (read the inputs once, write the same bytes), and peak RSS.

    python bench/bench_copy.py            # ~1 GB fp32 Llama, 200MB and 5GB output shards
    python bench/bench_copy.py --quick    # ~100 MB

Targets (issue 2): throughput >= 0.7 of the floor; peak RSS independent of the shard size.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import (baseline_rss, dir_bytes, io_floor, llama_config, make_random_llama, markdown_table,
                    surgery_command, timed, warm)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-copy-", dir=args.workdir))
    try:
        config = llama_config(1024, 2816, 2, 8000) if args.quick else llama_config(2048, 5632, 8, 32000)
        source = make_random_llama(work / "src", config, shard_bytes=400 * 10**6)
        size = dir_bytes(source)
        warm(source)
        inputs = sorted(source.glob("*.safetensors"))
        floor = min(io_floor(inputs, size, work / "floor") for _ in range(args.repeat))
        base = baseline_rss("import numpy, safetensors, rich.progress, surgery.cli, surgery.copy, surgery.writer.stream")
        rows = [["I/O floor (read once, write once)", f"{floor:.2f}", f"{size / floor / 1e6:.0f}", "1.00", "", ""]]
        for shard in ("200MB", "5GB"):
            runs = []
            for _ in range(args.repeat):
                out = work / f"out-{shard}"
                runs.append(timed(surgery_command("copy", source, out, "--max-shard-size", shard)))
                shutil.rmtree(out)
            wall = min(r[0] for r in runs)
            rss = max(r[1] for r in runs)
            rows.append([f"surgery copy, {shard} shards", f"{wall:.2f}", f"{size / wall / 1e6:.0f}",
                         f"{floor / wall:.2f}", f"{rss:.0f}", f"{rss - base:.0f}"])
        print(f"\ncheckpoint: {size / 1e9:.2f} GB fp32 ({len(inputs)} input shards, largest tensor "
              f"{max(config['vocab_size'] * config['hidden_size'], config['intermediate_size'] * config['hidden_size']) * 4 / 2**20:.0f} MiB); "
              f"best of {args.repeat}, warm page cache; baseline process RSS {base:.0f} MiB\n")
        print(markdown_table(["run", "wall s", "MB/s", "throughput vs floor", "peak RSS MiB", "RSS above baseline MiB"], rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
