"""`surgery prune` quality: an MoE with specialised experts pruned by each criterion, held-out loss per domain.

    python scripts/build_btx_world.py --out /tmp/btxworld     # once (~5-10 min on 2 cores)
    python bench/bench_prune.py --world /tmp/btxworld

The MoE: the BTX world's merge with the seed's FFN as a 4th expert (`surgery merge --include-seed
--router-init calibrated --non-ffn regmean`, top-2; the seed expert's router row fitted on all three
domains' text), so three experts are domain specialists and one a generalist. It is pruned to 3 experts (25 %) and 2 experts (50 %) with every criterion; the
scores come from one calibration pass on all three domains' calibration text (equal parts), reused
for every criterion (`--save-scores` / `--scores`). Every number is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import bench_btx
from common import REPO, markdown_table, surgery_command, timed

sys.path.insert(0, str(REPO))
CRITERIA = ("reap", "activation", "frequency", "random")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", required=True, help="a world built by scripts/build_btx_world.py")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calibration-tokens", type=int, default=3 * 4096)
    args = parser.parse_args()
    world = Path(args.world)
    work = Path(tempfile.mkdtemp(prefix="bench-prune-"))
    try:
        moe = work / "moe"
        calibration = work / "calibration.txt"  # equal parts of every domain (the seed expert's text, too)
        share = args.calibration_tokens * 4 // len(bench_btx.DOMAINS)  # ~4 characters per token
        calibration.write_text("\n".join((world / "data" / f"{d}.calibration.txt").read_text()[:share]
                                         for d in bench_btx.DOMAINS))
        merge = surgery_command("merge", moe, "--seed", world / "seed", "--include-seed", "--router-init",
                                "calibrated", "--non-ffn", "regmean", "--top-k", 2,
                                *[arg for d in bench_btx.DOMAINS for arg in ("--expert", f"{d}={world / d}")],
                                *[arg for d in bench_btx.DOMAINS
                                  for arg in ("--calibration", f"{d}={world / 'data' / f'{d}.calibration.txt'}")],
                                "--calibration", f"seed={calibration}")
        timed([str(c) for c in merge])
        evaluator = bench_btx.Evaluator(world, args.eval_tokens)
        rows = [["unpruned (4 experts, top-2)", "", *fmt(evaluator.of_path(moe)), ""]]
        scores = work / "scores.json"
        for keep in (3, 2):
            for criterion in CRITERIA:
                out = work / f"{criterion}-{keep}"
                scoring = (["--scores", scores] if scores.exists() else
                           ["--calibration", calibration, "--calibration-tokens", args.calibration_tokens,
                            "--save-scores", scores])
                command = surgery_command("prune", moe, out, "--keep", keep, "--criterion", criterion, *scoring)
                wall = timed([str(c) for c in command])[0]
                kept = kept_experts(out)
                rows.append([f"{criterion}, keep {keep}", kept, *fmt(evaluator.of_path(out)), f"{wall:.1f}"])
                print(f"  {rows[-1]}", file=sys.stderr, flush=True)
                shutil.rmtree(out)
        print(markdown_table(["model", "kept experts per layer (0-2: code, prose, math; 3: seed)", *bench_btx.DOMAINS,
                              "mean", "prune s"], rows))
        print(f"\nWorld: {world}; held-out loss in nats/token on {args.eval_tokens} tokens per domain; calibration: "
              f"{args.calibration_tokens} tokens, equal parts of each domain's calibration text.")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fmt(losses: dict) -> list[str]:
    return [f"{losses[d]:.3f}" for d in bench_btx.DOMAINS] + [f"{sum(losses.values()) / len(losses):.3f}"]


def kept_experts(out: Path) -> str:
    from surgery.io.checkpoint import Checkpoint

    with Checkpoint.open(out) as checkpoint:
        record = json.loads(next(iter(checkpoint.metadata.values()))["surgery_prune"])
    layers = record["layers"]
    return " ".join("".join(map(str, layers[key]["kept"])) for key in sorted(layers, key=int))


if __name__ == "__main__":
    main()
