"""`surgery merge` (Branch-Train-MiX): held-out loss per domain, and speed / memory against mergekit-moe.

    python bench/bench_btx.py                        # builds the BTX world (~10 min on 2 free cores), full tables
    python bench/bench_btx.py --world /tmp/btx       # reuses a world from scripts/build_btx_world.py
    python bench/bench_btx.py --quick                # small world, small speed test, no mergekit

Quality (one run; every number is measured in it): held-out loss (nats/token) per domain for each
expert, the seed, the plain dense average of all four models, the merge with each router init (top-2,
non-FFN weights averaged over all four models), the merge keeping the seed's non-FFN weights
(mergekit's approach), mergekit-moe `hidden` / `random` when its executable exists (a separate
virtualenv: python -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit), and one row
per router / merge idea, each changing one thing against the `calibrated` row.
Required (issue 6): calibrated < dense average on every domain; calibrated < seed-non-FFN merge
on the mean over domains. Stretch: calibrated within 5 % of each domain's own expert.

Speed and memory: seed + 3 experts of random-weight Llamas (~670 MB fp32 each; --quick: ~85 MB)
merged into a Mixtral with 1 GB output shards, under /usr/bin/time -v, warm page cache, best of
--repeat: `surgery merge` (random router, non-FFN averaged over 4 models, and --non-ffn seed) against
`mergekit-moe` (gate_mode random), and the calibrated merge (routers fitted layer by layer on
CALIBRATION_TOKENS tokens per domain) against `mergekit-moe` (gate_mode hidden, which also runs the
model on each expert's prompts). Targets: uncalibrated <= 1/3 of mergekit's wall time and <= 1/4 of
its peak RSS; calibrated faster than mergekit `hidden` with <= 1/4 of its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (REPO, llama_config, make_random_llama, markdown_table, save_word_tokenizer, surgery_command, timed,
                    warm)

sys.path.insert(0, str(REPO))
DOMAINS = ("code", "prose", "math")
MERGEKIT = Path("/tmp/mk/bin/mergekit-moe")
from btx_ideas import distilled, with_attention  # noqa: E402  (bench/ is on sys.path)

REGMEAN_PP = "BTX merge, calibrated router, RegMean++ non-FFN (--non-ffn regmean++ --no-head-fit)"
DEFAULT = ("BTX merge, calibrated router, RegMean++ non-FFN, head refitted to the experts' distributions "
           "(the default: the head fit runs by itself at this size)")
CALIBRATION_TOKENS = 2048  # per domain, in the calibrated speed rows
LOW_BUDGET = "200MB"  # holds the embedding (131 MB in float32) or one layer (155 MB), not the hidden states beside
# them: these are spilled to a file, and each layer's experts are read one at a time (the smallest footprint)


# ------------------------------------------------------------------ quality
def build_world(directory: Path, quick: bool, threads: int) -> Path:
    command = [sys.executable, str(REPO / "scripts" / "build_btx_world.py"), "--out", str(directory),
               "--threads", str(threads)] + (["--quick"] if quick else [])
    print(f"building the BTX world: {' '.join(command)}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=sys.stderr)
    return directory


class Evaluator:
    """Held-out loss per domain, the same windows for every model."""

    def __init__(self, world: Path, tokens: int, seq_len: int = 128):
        import torch
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(world / "seed"))
        self.seq_len = seq_len
        self.windows = {}
        for domain in DOMAINS:
            text = (world / "data" / f"{domain}.heldout.txt").read_text(encoding="utf-8")
            ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
            count = min(tokens, len(ids) - 1) // seq_len
            stream = torch.tensor(ids[:count * seq_len + 1])
            self.windows[domain] = (torch.stack([stream[i * seq_len:(i + 1) * seq_len] for i in range(count)]),
                                    torch.stack([stream[i * seq_len + 1:(i + 1) * seq_len + 1] for i in range(count)]))

    def losses(self, model) -> dict[str, float]:
        import torch

        out = {}
        with torch.no_grad():
            for domain, (inputs, targets) in self.windows.items():
                total, count = 0.0, 0
                for start in range(0, len(inputs), 16):
                    logits = model(input_ids=inputs[start:start + 16]).logits
                    total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                     targets[start:start + 16].reshape(-1),
                                                                     reduction="sum"))
                    count += targets[start:start + 16].numel()
                out[domain] = total / count
        return out

    def of_path(self, path: Path) -> dict[str, float]:
        from surgery.execution.loading import load_model

        return self.losses(load_model(path, "cpu", "float32"))


def dense_average(world: Path):
    from surgery.execution.loading import load_model

    models = [load_model(world / name, "cpu", "float32") for name in ("seed",) + DOMAINS]
    states = [model.state_dict() for model in models]
    averaged = {name: sum(state[name] for state in states) / len(states) for name in states[0]}
    models[0].load_state_dict(averaged)
    return models[0]


def surgery_merge(world: Path, out: Path, *, init: str, non_ffn: str = "average", include_seed: bool = False,
                  top_k: int = 2, fit: str = "logistic", weights=(), head_fit: bool | None = False) -> float:
    """`surgery merge` in-process (same code path as the CLI); returns seconds."""
    from surgery import console
    from surgery.btx.members import open_merge, resolve_router_init
    from surgery.btx.run import run_merge
    from surgery.btx.spec import spec_from_options
    from surgery.operations.output import OutputOptions

    console.VERBOSITY["level"] = -1
    spec = spec_from_options([f"{d}={world / d}" for d in DOMAINS], str(world / "seed"), include_seed,
                             [w for w in weights if not w.startswith("task-arithmetic")], non_ffn, top_k, "auto", init,
                             [f"{d}={world / 'data' / f'{d}.calibration.txt'}" for d in DOMAINS], None, 0, 16384, fit,
                             head_fit)
    for item in weights:  # seed + lambda * sum(expert - seed): a negative seed weight, which the CLI refuses
        if item.startswith("task-arithmetic="):
            scale = float(item.split("=")[1])
            spec.weights = {**{d: scale for d in DOMAINS}, "seed": 1 - len(DOMAINS) * scale}
    spec.router_init = resolve_router_init(spec)
    started = time.perf_counter()
    run_merge(open_merge(spec), out, OutputOptions(force=True))
    return time.perf_counter() - started


def mergekit_prompts(world: Path, domain: str, count: int = 16, size: int = 400) -> list[str]:
    text = (world / "data" / f"{domain}.calibration.txt").read_text(encoding="utf-8")
    step = max(size, len(text) // count)
    return [text[start:start + size] for start in range(0, len(text), step)][:count]


def mergekit_merge(world: Path, out: Path, gate_mode: str, work: Path) -> float:
    import yaml

    config = {"base_model": str(world / "seed"), "architecture": "mixtral", "gate_mode": gate_mode,
              "dtype": "float32", "experts_per_token": 2,
              "experts": [{"source_model": str(world / d), "positive_prompts": mergekit_prompts(world, d)}
                          for d in DOMAINS]}
    path = work / f"mergekit-{gate_mode}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()
    result = subprocess.run([str(MERGEKIT), str(path), str(out), "--device", "cpu", "--out-shard-size", "1B"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-1500:])
    return time.perf_counter() - started


def quality(args, work: Path) -> tuple[str, list[str]]:
    import torch

    torch.set_num_threads(args.threads)
    world = Path(args.world) if args.world else build_world(work / "world", args.quick, args.threads)
    settings = json.loads((world / "world.json").read_text())
    evaluator = Evaluator(world, args.eval_tokens or settings["args"]["eval_tokens"])
    rows: dict[str, dict] = {}
    seconds: dict[str, float] = {}

    def add(label, losses, took=None):
        rows[label] = losses
        if took is not None:
            seconds[label] = took
        print(f"  {label}: " + ", ".join(f"{d} {v:.3f}" for d, v in losses.items()), file=sys.stderr, flush=True)

    for name in DOMAINS + ("seed",):
        add(f"expert {name}" if name != "seed" else "seed", evaluator.of_path(world / name))
    add("dense average of all 4 models", evaluator.losses(dense_average(world)))

    def merged(label, **options):
        out = work / "merge"
        took = surgery_merge(world, out, **options)
        add(label, evaluator.of_path(out), took)
        shutil.rmtree(out, ignore_errors=True)

    for init in ("zero", "normal", "embedding", "calibrated"):
        merged(f"BTX merge, {init} router", init=init)
    merged("BTX merge, calibrated router, seed non-FFN (mergekit's approach)", init="calibrated", non_ffn="seed")
    merged("BTX merge, calibrated router, RegMean non-FFN (--non-ffn regmean)", init="calibrated", non_ffn="regmean")
    merged("BTX merge, calibrated router, RegMean over the 3 experts only (seed weight 0)", init="calibrated",
           non_ffn="regmean", weights=("seed=0",))
    merged(REGMEAN_PP, init="calibrated", non_ffn="regmean++")
    merged(DEFAULT, init="calibrated", non_ffn="regmean++", head_fit=None)
    if MERGEKIT.exists() and not args.quick:
        for gate_mode in ("hidden", "random"):
            out = work / f"mergekit-{gate_mode}"
            try:
                took = mergekit_merge(world, out, gate_mode, work)
                add(f"mergekit-moe {gate_mode}", evaluator.of_path(out), took)
            except Exception as exc:  # report, do not hide the rest of the table
                print(f"mergekit-moe {gate_mode} failed: {str(exc)[-300:]}", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
    skipped = [] if MERGEKIT.exists() and not args.quick else [
        "mergekit-moe rows skipped: " + ("--quick" if args.quick else f"{MERGEKIT} not found (python -m venv /tmp/mk "
                                         "&& /tmp/mk/bin/pip install torch==2.13.0 mergekit)")]
    ideas = [("idea: class-mean router fit (instead of logistic regression)", dict(init="calibrated", fit="class-mean")),
             ("idea: top-1 routing", dict(init="calibrated", top_k=1)),
             ("idea: seed FFN as a 4th expert (--include-seed)", dict(init="calibrated", include_seed=True)),
             ("idea: non-FFN averaged over the 3 experts only (seed weight 0)",
              dict(init="calibrated", weights=("seed=0",))),
             ("idea: non-FFN = seed + 0.5 * sum(expert - seed) (task arithmetic)",
              dict(init="calibrated", weights=("task-arithmetic=0.5",)))]
    if not args.quick and not args.skip_ideas:
        for label, options in ideas:
            merged(label, **options)
        out = work / "calibrated"
        surgery_merge(world, out, init="calibrated")
        add("idea: + norms and routers distilled from each domain's expert (60 Adam steps, calibration text)",
            distilled(world, out, evaluator))
        add("idea: + norms, routers and attention distilled the same way (training ~20% of the weights)",
            distilled(world, out, evaluator, with_attention, lr=0.003))
        shutil.rmtree(out, ignore_errors=True)
    return render_quality(rows, seconds, world, settings), skipped


def render_quality(rows: dict, seconds: dict, world: Path, settings: dict) -> str:
    experts = {d: rows[f"expert {d}"][d] for d in DOMAINS}
    table = []
    for label, losses in rows.items():
        mean = sum(losses.values()) / len(losses)
        gaps = " / ".join(f"{100 * (losses[d] / experts[d] - 1):+.1f}%" for d in DOMAINS)
        table.append([label] + [f"{losses[d]:.3f}" for d in DOMAINS] + [f"{mean:.3f}", gaps,
                                                                          f"{seconds[label]:.1f}" if label in seconds else ""])
    text = markdown_table(["model", *DOMAINS, "mean", "vs own expert (code / prose / math)", "merge s"], table)
    calibrated = rows["BTX merge, calibrated router"]
    dense = rows["dense average of all 4 models"]
    seed_non_ffn = rows["BTX merge, calibrated router, seed non-FFN (mergekit's approach)"]
    mean = lambda losses: sum(losses.values()) / len(losses)  # noqa: E731
    checks = [
        ("calibrated < dense average on every domain", all(calibrated[d] < dense[d] for d in DOMAINS)),
        ("calibrated < seed-non-FFN merge on the mean over domains", mean(calibrated) < mean(seed_non_ffn)),
        ("stretch: calibrated within 5% of each domain's own expert",
         all(calibrated[d] <= 1.05 * experts[d] for d in DOMAINS)),
    ]
    seed = rows["seed"]
    ratio = lambda losses: sum(losses[d] / experts[d] for d in DOMAINS) / len(DOMAINS)  # noqa: E731
    for name, label in (("--non-ffn regmean", "BTX merge, calibrated router, RegMean non-FFN (--non-ffn regmean)"),
                        ("--non-ffn regmean++ --no-head-fit", REGMEAN_PP),
                        ("the default merge (regmean++, head fit auto)", DEFAULT)):
        if label in rows:  # issue 15's target for a data-aware non-FFN merge
            merged_losses = rows[label]
            checks += [(f"{name} < seed alone and < dense average on every domain",
                        all(merged_losses[d] < min(seed[d], dense[d]) for d in DOMAINS)),
                       (f"{name}: mean ratio to the experts {ratio(merged_losses):.3f} at least halfway from the "
                        f"averaged merge's {ratio(calibrated):.3f} to 1.0",
                        ratio(merged_losses) - 1 <= (ratio(calibrated) - 1) / 2)]
    text += "\n\n" + "\n".join(f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in checks)
    text += (f"\n\nWorld: {world} ({settings['parameters']:,} parameters per model, "
             f"{settings['args']['seed_steps']} seed steps, {settings['args']['expert_steps']} steps per expert); "
             f"held-out loss in nats/token on {settings['args'].get('eval_tokens')} tokens per domain "
             f"(ln V = {settings['ln_vocab']}).")
    return text


# ------------------------------------------------------------------ speed and memory
def random_words(path: Path, vocab_size: int, seed: int, words: int = 20000) -> Path:
    """Calibration text for the random speed models: seeded words of their word-level vocabulary."""
    import random

    generator = random.Random(seed)
    path.write_text(" ".join(f"w{generator.randrange(3, vocab_size)}" for _ in range(words)) + "\n")
    return path


def prompts(path: Path, count: int = 16, words: int = 128) -> list[str]:
    """mergekit-moe positive prompts: `count` pieces of the same text (about as many tokens in all)."""
    tokens = path.read_text().split()
    return [" ".join(tokens[i * words:(i + 1) * words]) for i in range(count)]


def speed(args, work: Path) -> str:
    config = llama_config(512, 1408, 4, 8000, heads=8, kv_heads=8) if args.quick else \
        llama_config(1024, 2816, 8, 32000, heads=16, kv_heads=16)
    names = ("seed", "e1", "e2", "e3")
    models = {}
    where = Path(args.speed_models) if args.speed_models else work / "speed"
    (work / "speed").mkdir(parents=True, exist_ok=True)
    for number, name in enumerate(names):
        directory = where / name
        reuse = (directory / "config.json").exists() and json.loads((directory / "config.json").read_text()) == config
        models[name] = directory if reuse else make_random_llama(directory, config, shard_bytes=10**9, seed=number)
        if not (directory / "tokenizer.json").exists():
            save_word_tokenizer(directory, config["vocab_size"])  # mergekit-moe loads one in every mode
        warm(models[name])
    size = sum(p.stat().st_size for p in models["seed"].glob("*.safetensors"))
    experts = [arg for name in names[1:] for arg in ("--expert", f"{name}={models[name]}")]
    texts = {name: random_words(work / "speed" / f"{name}.txt", config["vocab_size"], number)
             for number, name in enumerate(names[1:], 1)}
    calibration = [arg for name in names[1:] for arg in ("--calibration", f"{name}={texts[name]}")]
    runs = {
        f"surgery merge --router-init calibrated ({CALIBRATION_TOKENS} tokens per domain)":
            surgery_command("merge", work / "speed" / "out", "--seed", models["seed"], *experts, *calibration,
                            "--router-init", "calibrated", "--non-ffn", "average", "--calibration-tokens",
                            CALIBRATION_TOKENS, "--device", "cpu", "--max-shard-size", "1GB", "--force"),
        f"surgery merge --router-init calibrated --compute-dtype bfloat16 ({CALIBRATION_TOKENS} tokens per domain)":
            surgery_command("merge", work / "speed" / "out", "--seed", models["seed"], *experts, *calibration,
                            "--router-init", "calibrated", "--non-ffn", "average", "--calibration-tokens",
                            CALIBRATION_TOKENS, "--device", "cpu", "--compute-dtype", "bfloat16", "--max-shard-size",
                            "1GB", "--force"),
        f"surgery merge --router-init calibrated --memory-budget {LOW_BUDGET} ({CALIBRATION_TOKENS} tokens per domain)":
            surgery_command("merge", work / "speed" / "out", "--seed", models["seed"], *experts, *calibration,
                            "--router-init", "calibrated", "--non-ffn", "average", "--calibration-tokens",
                            CALIBRATION_TOKENS, "--device", "cpu", "--memory-budget", LOW_BUDGET, "--max-shard-size",
                            "1GB", "--force"),
        f"surgery merge --router-init calibrated --non-ffn regmean++ (the default; {CALIBRATION_TOKENS} tokens per domain)":
            surgery_command("merge", work / "speed" / "out", "--seed", models["seed"], *experts, *calibration,
                            "--router-init", "calibrated", "--non-ffn", "regmean++", "--calibration-tokens",
                            CALIBRATION_TOKENS, "--device", "cpu", "--max-shard-size", "1GB", "--force"),
        "surgery merge (non-FFN averaged over 4 models)":
            surgery_command("merge", work / "speed" / "out", "--seed", models["seed"], *experts, "--router-init",
                            "normal", "--non-ffn", "average", "--max-shard-size", "1GB", "--force"),
        "surgery merge --non-ffn seed (mergekit's work)":
            surgery_command("merge", work / "speed" / "out", "--seed", models["seed"], *experts, "--router-init",
                            "normal", "--non-ffn", "seed", "--max-shard-size", "1GB", "--force"),
    }
    if MERGEKIT.exists() and not args.quick:
        import yaml

        mk_config = {"base_model": str(models["seed"]), "architecture": "mixtral", "gate_mode": "random",
                     "dtype": "float32", "experts_per_token": 2,
                     "experts": [{"source_model": str(models[n])} for n in names[1:]]}
        (work / "speed" / "mk.yml").write_text(yaml.safe_dump(mk_config, sort_keys=False))
        runs["mergekit-moe (gate_mode random)"] = [str(MERGEKIT), str(work / "speed" / "mk.yml"),
                                                   str(work / "speed" / "out"), "--device", "cpu",
                                                   "--out-shard-size", "1B"]
        hidden = {**mk_config, "gate_mode": "hidden",
                  "experts": [{"source_model": str(models[n]), "positive_prompts": prompts(texts[n])}
                              for n in names[1:]]}
        (work / "speed" / "mk-hidden.yml").write_text(yaml.safe_dump(hidden, sort_keys=False))
        runs["mergekit-moe (gate_mode hidden)"] = [str(MERGEKIT), str(work / "speed" / "mk-hidden.yml"),
                                                   str(work / "speed" / "out"), "--device", "cpu",
                                                   "--out-shard-size", "1B"]
    for dtype in ("float32", "bfloat16"):  # what no implementation of the calibrated pass can go below
        runs[f"floor: imports + the calibrated pass's matrix products alone, {dtype}"] = [
            sys.executable, "-c", floor_script(config, models["seed"], 3 * CALIBRATION_TOKENS, dtype, args.threads)]
    results = {label: [] for label in runs}
    out_bytes = 0
    for round_number in range(args.repeat):  # round robin: a slow spell of the disk hits every tool alike
        for label, command in runs.items():
            shutil.rmtree(work / "speed" / "out", ignore_errors=True)
            os.sync()  # every run starts with no dirty pages left by the one before
            results[label].append(timed([str(c) for c in command], env={"TOKENIZERS_PARALLELISM": "false"}))
            written = sum(p.stat().st_size for p in (work / "speed" / "out").glob("*.safetensors"))
            out_bytes = written or out_bytes  # the floor rows write nothing
            print(f"  round {round_number + 1} {label}: {results[label][-1][0]:.1f} s, "
                  f"{results[label][-1][1]:.0f} MiB", file=sys.stderr, flush=True)
    measured = {label: (min(r[0] for r in runs_of), max(r[1] for r in runs_of)) for label, runs_of in results.items()}
    baseline = measured.get("mergekit-moe (gate_mode random)")
    hidden_baseline = measured.get("mergekit-moe (gate_mode hidden)")
    rows = []
    for label, (wall, rss) in measured.items():
        peer = hidden_baseline if "calibrated" in label or "hidden" in label else baseline
        ratio = f"{wall / peer[0]:.2f} / {rss / peer[1]:.2f}" if peer else "n/a"
        rows.append([label, f"{wall:.1f}", f"{rss:.0f}", ratio])
    text = markdown_table(["run", "wall s", "peak RSS MiB", "vs mergekit (wall / RSS; calibrated vs hidden)"], rows)
    text += (f"\n\nInputs: seed + 3 experts, random Llama, {size / 1e6:.0f} MB fp32 each; output Mixtral "
             f"{out_bytes / 1e6:.0f} MB in 1 GB shards; warm page cache, `sync` before every run, runs "
             f"interleaved round robin; best wall / worst RSS of {args.repeat}.")
    if baseline:
        surgery_wall, surgery_rss = measured["surgery merge (non-FFN averaged over 4 models)"]
        text += "\n\n" + "\n".join([
            f"- {'PASS' if surgery_wall <= baseline[0] / 3 else 'FAIL'}: wall time <= 1/3 of mergekit-moe's "
            f"({surgery_wall:.1f} s vs {baseline[0]:.1f} s)",
            f"- {'PASS' if surgery_rss <= baseline[1] / 4 else 'FAIL'}: peak RSS <= 1/4 of mergekit-moe's "
            f"({surgery_rss:.0f} MiB vs {baseline[1]:.0f} MiB)"])
    if hidden_baseline:
        wall, rss = measured[f"surgery merge --router-init calibrated ({CALIBRATION_TOKENS} tokens per domain)"]
        text += "\n" + "\n".join([
            f"- {'PASS' if wall < hidden_baseline[0] else 'FAIL'}: calibrated merge faster than mergekit-moe hidden "
            f"({wall:.1f} s vs {hidden_baseline[0]:.1f} s)",
            f"- {'PASS' if rss <= hidden_baseline[1] / 4 else 'FAIL'}: calibrated merge peak RSS <= 1/4 of mergekit-moe "
            f"hidden's ({rss:.0f} MiB vs {hidden_baseline[1]:.0f} MiB)"])
        low = measured.get(f"surgery merge --router-init calibrated --memory-budget {LOW_BUDGET} "
                           f"({CALIBRATION_TOKENS} tokens per domain)")
        if low:
            text += (f"\n- {'PASS' if low[0] < hidden_baseline[0] and low[1] <= hidden_baseline[1] / 4 else 'FAIL'}: "
                     f"with --memory-budget {LOW_BUDGET}, faster than mergekit-moe hidden with <= 1/4 of its peak RSS "
                     f"({low[0]:.1f} s, {low[1]:.0f} MiB vs {hidden_baseline[0]:.1f} s, {hidden_baseline[1]:.0f} MiB)")
        floors = {d: measured.get(f"floor: imports + the calibrated pass's matrix products alone, {d}")
                  for d in ("float32", "bfloat16")}
        if all(floors.values()):
            text += (f"\n- floors: importing what the calibrated merge imports and running only its pass's matrix "
                     f"products takes {floors['float32'][0]:.1f} s / {floors['float32'][1]:.0f} MiB in float32 and "
                     f"{floors['bfloat16'][0]:.1f} s / {floors['bfloat16'][1]:.0f} MiB in bfloat16 (no reading, "
                     f"writing, attention scores or router fits), against mergekit-moe hidden's "
                     f"{hidden_baseline[0]:.1f} s; 1/4 of its peak RSS is {hidden_baseline[1] / 4:.0f} MiB")
    else:
        text += "\n\nmergekit-moe: skipped (" + ("--quick" if args.quick else f"{MERGEKIT} not found") + ")"
    return text


def floor_script(config: dict, model: Path, tokens: int, dtype: str, threads: int) -> str:
    """A process that imports what the calibrated merge imports (torch, transformers' Mixtral, the tokenizer) and
    runs only the matrix products of its pass: every layer's q/k/v/o on all `tokens`, the top-2 experts' products
    in every layer but the last (whose router input is all the fit needs), 256 tokens per call like the runner."""
    hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    return f"""
import torch
from transformers import AutoTokenizer
from transformers.models.mixtral import modeling_mixtral
AutoTokenizer.from_pretrained({str(model)!r})
torch.set_num_threads({threads})
d = torch.{dtype}
x = torch.randn(256, {hidden}, dtype=d)
shapes = [({hidden}, {hidden}), ({kv}, {hidden}), ({kv}, {hidden}), ({hidden}, {hidden})]
weights = [torch.randn(*s, dtype=d) * 0.02 for s in shapes]
gate_up, down = torch.randn(2 * {inner}, {hidden}, dtype=d) * 0.02, torch.randn({hidden}, {inner}, dtype=d) * 0.02
with torch.no_grad():
    for layer in range({layers}):
        for start in range(0, {tokens}, 256):
            for w in weights:
                torch.nn.functional.linear(x, w)
            if layer < {layers} - 1:
                for _ in range(2):
                    h = torch.nn.functional.linear(x, gate_up)[:, :{inner}]
                    torch.nn.functional.linear(h.contiguous(), down)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", help="a world built by scripts/build_btx_world.py (default: build one)")
    parser.add_argument("--quick", action="store_true", help="small world and small speed test, no mergekit")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per domain")
    parser.add_argument("--repeat", type=int, default=None, help="runs per speed row (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed-models", help="keep (and reuse) the random speed-test models in this directory")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-ideas", action="store_true", help="quality: only the main rows (no idea rows)")
    args = parser.parse_args()
    args.repeat = args.repeat or (1 if args.quick else 3)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="bench-btx-", dir=args.workdir))
    try:
        if not args.skip_quality:
            table, skipped = quality(args, work)
            print("\n## Held-out loss per domain (nats/token, lower is better)\n")
            print(table)
            for line in skipped:
                print(f"\n{line}")
        if not args.skip_speed:
            print("\n## Speed and memory: seed + 3 experts -> Mixtral\n")
            print(speed(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
