"""`surgery split`: held-out loss of every strategy x router init, the expert scale, clustering speed, memory.

    python bench/bench_split.py                 # full tables (~15-30 min on 2 busy cores)
    python bench/bench_split.py --quick         # a reduced run, well under a minute
    python bench/bench_split.py --model DIR     # another dense Llama with a tokenizer

1. Quality, on the repo's trained demo model (examples/demo-llama): each strategy splits every FFN
   into N = 8 experts; for top-k 2 and 4, each router init (zero, normal, centroid, calibrated) and
   each expert scale (K, N/K, N) the MoE is written by the real plan/writer, loaded with
   transformers and scored on held-out text. Calibration uses the shipped sample
   (surgery/data/sample.txt: held-out stdlib files); evaluation uses *other* held-out files of the
   same split (every 10th stdlib file, never seen in training), so calibration and evaluation never
   overlap. The dense model is scored on the same tokens in the same run. "time" is the partition
   time of the strategy (calibration statistics included, model load excluded).
2. Speed: balanced clustering of a 7B-sized FFN (11008 x 4096 fp32 random rows, 8 experts), 2
   threads, against scikit-learn's plain (unbalanced) KMeans on the same rows in the same run.
3. Memory (full run only): peak RSS of `surgery split --strategy clustering` on a random-weight
   Llama against the checkpoint size: partitions read one layer's FFN at a time.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, llama_config, make_random_llama, markdown_table, surgery_command, timed

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

STRATEGIES = ["random", "clustering", "sharing-inner", "sharing-inter", "shared-norm", "coactivation"]
ROUTERS = ["zero", "normal", "centroid", "calibrated"]
SCALES = ["K", "N/K", "N"]
NUM_EXPERTS = 8


# ------------------------------------------------------------------ held-out evaluation text
def stdlib_files() -> list[Path]:
    """The demo trainer's corpus file list (same filters and order as scripts/train_demo_model.py),
    walking the stdlib with skipped directories pruned (site-packages is not scanned)."""
    import os
    import sysconfig

    import train_demo_model as demo

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirectories, names in os.walk(stdlib):
        subdirectories[:] = [d for d in subdirectories
                             if d not in demo.SKIP_DIRS and not d.startswith(demo.SKIP_DIR_PREFIXES)]
        for name in names:
            path = Path(directory) / name
            if name.endswith(".py") and not name.startswith(demo.SKIP_FILE_PREFIXES) and path.is_file():
                files.append(path)
    files.sort(key=lambda p: p.relative_to(stdlib).as_posix())
    return files


def heldout_text(model: Path, sample_text: str, max_bytes: int) -> str:
    """Held-out stdlib files of the demo's split that are not part of the calibration sample."""
    import train_demo_model as demo

    readme = (model / "README.md").read_text() if (model / "README.md").exists() else ""
    found = re.search(r"Every (\d+)th file is held out", readme)
    every = int(found.group(1)) if found else 10
    files = stdlib_files()
    chunks, total = [], 0
    for index, path in enumerate(files):
        if index % every != every // 2:
            continue
        text = demo.read_text(path)
        if text is None or text in sample_text:
            continue
        chunks.append(text)
        total += len(text.encode())
        if total >= max_bytes:
            break
    return "\n".join(chunks)


class Scorer:
    """Mean next-token loss (nats/token) on fixed held-out batches."""

    def __init__(self, model: Path, text: str, max_tokens: int):
        from surgery.execution import batches as samples
        from surgery.execution.loading import load_tokenizer

        tokenizer = load_tokenizer(model)
        self.batches = list(samples.text_batches(tokenizer, text, batch_size=8, seq_len=256, max_tokens=max_tokens))
        self.tokens = sum(batch.tokens for batch in self.batches)

    def loss(self, path: Path) -> float:
        import torch

        from surgery.execution.loading import load_model

        model = load_model(path, "cpu", "float32")
        total, count = 0.0, 0
        with torch.inference_mode():
            for batch in self.batches:
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
                targets = batch.input_ids[:, 1:].clone()
                targets[batch.attention_mask[:, 1:] == 0] = -100
                total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                           ignore_index=-100, reduction="sum").item()
                count += int((targets != -100).sum())
        return total / count


# ------------------------------------------------------------------ 1. quality
def quality(model: Path, quick: bool, eval_tokens: int, calibration_tokens: int, scratch: Path) -> None:
    import torch

    torch.set_num_threads(1)  # a 1M-parameter model: thread hand-offs cost more than they save on 2 busy cores
    from surgery import split as split_module
    from surgery.partition import plan as split_plan
    from surgery.execution.calibration import CalibrationSet
    from surgery.partition.calibrated import partition_layers
    from surgery.plan.sources import open_dense_source
    from surgery.plan.moe import parse_moe_layers
    from surgery.io.data_files import SAMPLE_TEXT, read_text
    from surgery.writer.stream import write_plan

    source, family = open_dense_source(model)
    ffn, layers_count = source.config["intermediate_size"], source.config["num_hidden_layers"]
    sample = read_text(SAMPLE_TEXT)
    scorer = Scorer(model, heldout_text(model, sample, 8 * eval_tokens), eval_tokens)
    dense = scorer.loss(model)
    calibration = CalibrationSet.load(SAMPLE_TEXT, model, source.config, calibration_tokens)
    strategies = ["random", "clustering"] if quick else STRATEGIES
    routers = ["zero", "centroid"] if quick else ROUTERS
    top_ks = [2] if quick else [2, 4]
    scales = ["auto"] if quick else ["auto"] + SCALES
    layers = parse_moe_layers("all", layers_count)
    print(f"model {model}: hidden {source.config['hidden_size']}, ffn {ffn}, {layers_count} layers; "
          f"held-out eval {scorer.tokens} tokens; calibration {calibration.tokens} tokens (shipped sample)",
          file=sys.stderr, flush=True)
    results = {}  # (strategy, k, router, scale) -> loss
    times, active = {}, {}
    for strategy in strategies:
        options = split_module.SplitOptions(NUM_EXPERTS, 2, strategy, calibration_tokens=calibration_tokens)
        started = time.perf_counter()
        partitions = partition_layers(source, family, options, layers, ffn, split_plan.shared_count(options, ffn),
                                      calibration=calibration, settings=options.run).partitions
        times[strategy] = time.perf_counter() - started
        for k in top_ks:
            part = next(iter(partitions.values()))
            active[strategy, k] = (len(part.shared) + k * statistics.mean(len(e) for e in part.experts)) / ffn
            for router in routers:
                done = {}  # scale value -> loss: labels with equal values (auto = N/K at 2/8) are scored once
                for scale in scales:
                    value = split_plan.resolve_expert_scale(scale, NUM_EXPERTS, k)
                    if value in done:
                        results[strategy, k, router, scale] = done[value]
                        continue
                    options = split_module.SplitOptions(NUM_EXPERTS, k, strategy, router_init=router, expert_scale=scale,
                                                        calibration_tokens=calibration_tokens)
                    plan = split_plan.build_plan(source, family, options, calibration=calibration,
                                                   partitions=partitions)
                    write_plan(plan, scratch / "moe", force=True)
                    results[strategy, k, router, scale] = done[value] = scorer.loss(scratch / "moe")
                    print(f"  {strategy:13s} top-{k} {router:10s} scale {scale:4s} loss "
                          f"{results[strategy, k, router, scale]:.4f}", file=sys.stderr, flush=True)

    print(f"\n### Split quality: held-out loss vs dense ({model.name}, N = {NUM_EXPERTS}, expert scale auto)\n")
    print(f"Dense loss {dense:.4f} nats/token on {scorer.tokens} held-out tokens; Δ = MoE loss - dense loss.\n")
    headers = ["strategy", "router"] + [f"loss {k}/{NUM_EXPERTS}" for k in top_ks] + \
              [f"Δ {k}/{NUM_EXPERTS}" for k in top_ks] + \
              ["active FFN (" + ", ".join(f"{k}/{NUM_EXPERTS}" for k in top_ks) + ")", "partition time (s)"]
    rows = []
    for strategy in strategies:
        for router in routers:
            losses = [results[strategy, k, router, "auto"] for k in top_ks]
            rows.append([strategy, router] + [f"{x:.4f}" for x in losses] + [f"{x - dense:+.4f}" for x in losses] +
                        [", ".join(f"{active[strategy, k]:.0%}" for k in top_ks), f"{times[strategy]:.2f}"])
    print(markdown_table(headers, rows))
    if len(scales) > 1:
        print(f"\n### Expert scale: mean Δ loss over the {len(strategies)} strategies\n")
        headers = ["top-k", "router"] + [f"scale {s}" for s in SCALES] + [f"auto (= {split_plan.AUTO_SCALE})"]
        rows = []
        for k in top_ks:
            for router in routers:
                cells = [statistics.mean(results[s, k, router, scale] for s in strategies) - dense
                         for scale in SCALES + ["auto"]]
                best = min(cells)
                rows.append([f"{k}/{NUM_EXPERTS}", router] + [f"**{c:+.4f}**" if c == best else f"{c:+.4f}" for c in cells])
        print(markdown_table(headers, rows))


# ------------------------------------------------------------------ 2. speed
def speed(quick: bool) -> None:
    import numpy as np
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from surgery.partition import LayerInputs, strategy

    rows, cols = (2752, 1024) if quick else (11008, 4096)
    data = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
    weights = {"up": data}
    inputs = LayerInputs(layer=0, ffn=rows, num_experts=NUM_EXPERTS, shared_count=0, seed=0, read=weights.__getitem__)
    with threadpool_limits(2):
        started = time.perf_counter()
        partition = strategy("clustering").split(inputs)
        ours = time.perf_counter() - started
        started = time.perf_counter()
        plain = KMeans(n_clusters=NUM_EXPERTS, n_init=1, random_state=0).fit(data / np.linalg.norm(data, axis=1, keepdims=True))
        theirs = time.perf_counter() - started
    sizes = np.bincount(plain.labels_, minlength=NUM_EXPERTS)
    print(f"\n### Balanced clustering speed: {rows} x {cols} fp32 rows, {NUM_EXPERTS} experts, 2 threads\n")
    print(markdown_table(
        ["method", "seconds", "vs sklearn KMeans", "cluster sizes", "cosine spread"],
        [["surgery clustering (balanced)", f"{ours:.1f}", f"{ours / theirs:.2f}x",
          f"{min(len(e) for e in partition.experts)}-{max(len(e) for e in partition.experts)}",
          f"{partition.stats['cosine_spread']:.4f}"],
         ["sklearn KMeans (k-means++, unbalanced)", f"{theirs:.1f}", "1.00x", f"{sizes.min()}-{sizes.max()}",
          f"{partition.stats['unconstrained_cosine_spread']:.4f} (ours, unbalanced)"]]))
    print(f"\nTarget: <= 30 s per layer for 11008 x 4096{' (quick mode measures a 1/16 size)' if quick else ''}.")


# ------------------------------------------------------------------ 3. memory
def memory(scratch: Path) -> None:
    config = llama_config(hidden=1024, ffn=4096, layers=8, vocab=8192)
    source = make_random_llama(scratch / "random-llama", config)
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    baseline = timed([sys.executable, "-c", "import torch, sklearn.cluster, safetensors, surgery.writer.stream"])[1]
    rows = []
    for strategy in ("random", "clustering"):
        wall, rss, _ = timed(surgery_command("split", source, scratch / f"out-{strategy}", "-n", 8, "-k", 2,
                                             "--strategy", strategy, "--force"))
        rows.append([strategy, f"{wall:.1f}", f"{rss:.0f}", f"{rss - baseline:.0f}"])
    ffn_layer = 3 * 4 * 1024 * 4096 / 2**20
    print(f"\n### Peak memory of `surgery split` (random Llama, {size / 2**20:.0f} MiB fp32; one layer's FFN: "
          f"{ffn_layer:.0f} MiB; imports alone: {baseline:.0f} MiB)\n")
    print(markdown_table(["strategy", "wall (s)", "peak RSS (MiB)", "above imports (MiB)"], rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "examples" / "demo-llama")
    parser.add_argument("--quick", action="store_true", help="reduced run, well under a minute")
    parser.add_argument("--eval-tokens", type=int, default=None)
    parser.add_argument("--calibration-tokens", type=int, default=None)
    parser.add_argument("--skip", default="", help="comma list of sections to skip: quality,speed,memory")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    eval_tokens = args.eval_tokens or (2048 if args.quick else 32768)
    calibration_tokens = args.calibration_tokens or (1024 if args.quick else 8192)
    with tempfile.TemporaryDirectory(prefix="bench-split-") as scratch:
        if "quality" not in skip:
            if not (args.model / "config.json").exists():
                sys.exit(f"{args.model}: no model (build it with python scripts/train_demo_model.py)")
            quality(args.model, args.quick, eval_tokens, calibration_tokens, Path(scratch))
        if "speed" not in skip:
            speed(args.quick)
        if "memory" not in skip and not args.quick:
            memory(Path(scratch))


if __name__ == "__main__":
    main()
