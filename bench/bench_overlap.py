"""Does the writer's read-ahead (reading the next tensors' inputs while this one is written) pay off?

    python bench/bench_overlap.py            # ~1.1 GB fp32 Llama; needs root for cold-cache rows
    python bench/bench_overlap.py --quick    # ~160 MB, one run per row

The writer asks the kernel (posix_fadvise WILLNEED) to start reading the inputs of the tensors after
the current one, up to SURGERY_READ_AHEAD_BYTES (default 256 MiB; 0 turns it off), so the disk works
while the writer computes, checks and writes. Each operation runs with read-ahead off ("before") and
on ("after"), interleaved round robin, best wall of --repeat:
- cold page cache (`sync; echo 3 > /proc/sys/vm/drop_caches` before every run, needs root): the case
  read-ahead is for;
- warm page cache: read-ahead must not cost anything there.
Operations: `copy --dtype bf16` (every tensor computed: read, cast, check, write), `upcycle` to 4
experts, and `split` into 4 experts (reads row subsets).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import dir_bytes, drop_caches, llama_config, make_random_llama, markdown_table, surgery_command, timed, warm


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--repeat", type=int, default=None)
    args = parser.parse_args()
    repeat = args.repeat or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="bench-overlap-", dir=args.workdir))
    try:
        config = llama_config(1024, 2816, 2, 8000) if args.quick else llama_config(2048, 5632, 8, 32000)
        source = make_random_llama(work / "src", config, shard_bytes=400 * 10**6)
        size = dir_bytes(source)
        out = work / "out"
        operations = {
            "copy --dtype bf16": ["copy", source, out, "--dtype", "bf16"],
            "upcycle 4 experts": ["upcycle", source, out, "--num-experts", "4", "--top-k", "2"],
            "split 4 experts (random)": ["split", source, out, "--num-experts", "4", "--top-k", "4",
                                         "--strategy", "random"],
        }
        cold_possible = drop_caches()
        caches = ["cold", "warm"] if cold_possible else ["warm"]
        settings = {"before (read-ahead off)": "0", "after (read-ahead on)": str(256 * 2**20)}
        results: dict[tuple, list[float]] = {}
        for cache in caches:
            for _ in range(repeat):
                for label, command in operations.items():
                    for setting, value in settings.items():
                        shutil.rmtree(out, ignore_errors=True)
                        if cache == "cold":
                            drop_caches()
                        else:
                            os.sync()
                            warm(source)
                        wall, _, _ = timed([str(c) for c in surgery_command(*command)],
                                           env={"SURGERY_READ_AHEAD_BYTES": value})
                        results.setdefault((cache, label, setting), []).append(wall)
                        print(f"  {cache} {label} {setting}: {wall:.2f} s", file=sys.stderr, flush=True)
        rows = []
        for cache in caches:
            for label in operations:
                before = results[(cache, label, "before (read-ahead off)")]
                after = results[(cache, label, "after (read-ahead on)")]
                mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
                rows.append([cache, label, f"{min(before):.2f} / {mean_before:.2f}", f"{min(after):.2f} / {mean_after:.2f}",
                             f"{min(before) / min(after):.2f}x / {mean_before / mean_after:.2f}x"])
        print(f"\n## Read-ahead: wall seconds, best / mean of {repeat}\n")
        print(markdown_table(["page cache", "operation", "before: read-ahead off", "after: read-ahead on",
                              "speed-up (best / mean)"], rows))
        print(f"\nInput: random fp32 Llama, {size / 1e9:.2f} GB in 400 MB shards.")
        if not cold_possible:
            print("\nCold-cache rows skipped: dropping the page cache needs root.")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
