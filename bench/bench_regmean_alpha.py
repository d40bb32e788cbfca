"""RegMean's off-diagonal scale alpha on a BTX world: held-out loss per domain for each alpha.

    python bench/bench_regmean_alpha.py --world /tmp/btxworld [--alphas 0.5 0.7 0.9 0.95 1.0] [--non-ffn regmean++]

Each row is the same `surgery merge --router-init calibrated --non-ffn regmean` (or `regmean++`) as bench_btx.py's row,
in-process, with ``surgery.btx.card.ALPHA`` set (read by the merge and the text it writes); losses on bench_btx.py's held-out windows.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import bench_btx
from common import REPO, markdown_table

sys.path.insert(0, str(REPO))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", required=True, help="a world built by scripts/build_btx_world.py")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.95, 1.0])
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--non-ffn", default="regmean", choices=["regmean", "regmean++"])
    args = parser.parse_args()
    from surgery.btx import card

    world = Path(args.world)
    evaluator = bench_btx.Evaluator(world, args.eval_tokens)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-regmean-"))
    try:
        for alpha in args.alphas:
            card.ALPHA = alpha
            out = work / f"alpha-{alpha}"
            took = bench_btx.surgery_merge(world, out, init="calibrated", non_ffn=args.non_ffn)
            losses = evaluator.of_path(out)
            rows.append([f"{alpha:g}", *(f"{losses[d]:.3f}" for d in bench_btx.DOMAINS),
                         f"{sum(losses.values()) / len(losses):.3f}", f"{took:.0f}"])
            print(f"  alpha {alpha:g}: {rows[-1]}", file=sys.stderr, flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"--non-ffn {args.non_ffn}\n")
    print(markdown_table(["alpha", *bench_btx.DOMAINS, "mean", "merge s"], rows))


if __name__ == "__main__":
    main()
