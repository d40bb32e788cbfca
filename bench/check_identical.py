"""Prove that a refactoring changed no output byte: run a fixed suite of `surgery` commands with the code of two
commits and compare the sha256 of every output shard.

    python bench/check_identical.py --base b4d22dc                       # against the working tree
    python bench/check_identical.py --base b4d22dc --head HEAD --only merge-default prune-reap --keep

How: each commit's code runs from its own checkout (`git worktree add --detach WORKDIR/base REV`, the same for a
--head revision; `--head WORKTREE`, the default, is the repository itself, uncommitted changes included). Every
command is `sys.executable -m surgery ...` with cwd and PYTHONPATH the checkout (`-m` puts the cwd first on
sys.path, ahead of the editable install), HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1, TOKENIZERS_PARALLELISM=false;
`surgery.__file__` is checked to lie in the checkout once per side. Cases run base then head, one case at a time;
with `--repeat N` each case runs N rounds of base-then-head (every round's bytes compared; the table shows the
median wall time and the worst peak RSS of each side).

Inputs, built once under WORKDIR/inputs from the base checkout and shared by both sides: the demo Llama
(examples/demo-llama, copied; also the merge seed), a.txt / b.txt / c.txt (the thirds, by lines, of
surgery/data/sample.txt), experts a / b / c (the demo with 0.1 x std x N(0, 1) added to every float tensor, one
torch generator seeded 1 / 2 / 3 per model, tensors drawn in sorted name order; at 0.01 the merged model already
matched the experts, the head fit kept its step 0 and no byte of merge-default came from it), mistral-a / mistral-b
(a and b with a Mistral config.json: add-experts takes a Mixtral's experts from Mistral models only) and two MoEs
upcycled by the base code with noise: moe4 (4 experts, top-2) and moe-qwen (qwen2_moe with a shared expert).

A case fails when either side exits non-zero, the sets of shard files differ or any `*.safetensors` differs. Other
output files that differ (config.json, README.md, the index ...) are listed for information; surgery-manifest.json
(version and hash list) is not compared. A differing shard is told apart: `tensors`, or `metadata KEYS only` (the
safetensors header holds surgery_version, the inputs' absolute paths and the options: why the inputs are shared and
why a version bump alone fails a case). Per run: exit code, wall time and peak RSS (/usr/bin/time -v). The
markdown table goes to stdout, progress to stderr; exit 1 on any difference. Every option of the suite exists at
b4d22dc (checked against `--help`). About 4 minutes per side and round on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "surgery-manifest.json"
NOISE = 0.1  # x each tensor's std; at 0.01 the merged model already matches the experts and the head fit keeps step 0
CAL = "--calibration-tokens 1024"
MERGE = ("merge {OUT} --seed {SEED} --expert a={A} --expert b={B} --expert c={C} --calibration a={a_txt} "
         f"--calibration b={{b_txt}} --calibration c={{c_txt}} {CAL}")
SPLIT = f"split {{DEMO}} {{OUT}} -n 4 -k 2 {CAL} --strategy"
CASES = {
    "demo-upcycle": "upcycle {DEMO} {OUT} --num-experts 8 --top-k 2",
    "upcycle-calibrated": f"upcycle {{DEMO}} {{OUT}} -n 4 -k 2 --router-init calibrated {CAL}",
    "upcycle-granular-noise": "upcycle {DEMO} {OUT} -n 8 -k 4 -g 2 --noise 0.1 --drop-upcycle 0.2 --seed 5",
    "upcycle-qwen-shared": "upcycle {DEMO} {OUT} -n 4 -k 2 --format qwen2_moe --shared-expert --router-init uniform",
    **{f"split-{strategy}": f"{SPLIT} {strategy}" for strategy in
       ("random", "clustering", "sharing-inner", "sharing-inter", "shared-norm", "coactivation")},
    "split-exact": "split {DEMO} {OUT} -n 4 -k 4 --strategy random",
    "split-centroid": "split {DEMO} {OUT} -n 4 -k 2 --strategy clustering --router-init centroid",
    "split-normal-qwen": (f"split {{DEMO}} {{OUT}} -n 4 -k 2 --strategy coactivation --router-init normal "
                          f"--format qwen2_moe --shared-fraction 0.1 {CAL}"),
    "merge-default": MERGE,
    "merge-regmean": f"{MERGE} --non-ffn regmean",
    "merge-average": f"{MERGE} --non-ffn average",
    "merge-class-mean": f"{MERGE} --router-fit class-mean --no-head-fit",
    "merge-embedding": f"{MERGE} --router-init embedding",
    "merge-normal": "merge {OUT} --seed {SEED} --expert a={A} --expert b={B} --router-init normal --include-seed",
    "merge-bf16": f"{MERGE} --non-ffn average --dtype bf16",
    "prune-reap": f"prune {{MOE4}} {{OUT}} --keep 2 {CAL}",
    "prune-frequency-fused": f"prune {{MOE4}} {{OUT}} --ratio 0.5 --criterion frequency {CAL} --layout fused",
    "prune-random": "prune {MOE4} {OUT} --keep 3 --criterion random --seed 2",
    "prune-qwen": f"prune {{MOEQWEN}} {{OUT}} --keep 2 --criterion activation {CAL}",
    "extract-expert": "extract {MOE4} {OUT} --expert 1",
    "extract-frequency": f"extract {{MOE4}} {{OUT}} --average frequency {CAL}",
    "extract-qwen-fold": "extract {MOEQWEN} {OUT} --average uniform --shared-gate fold",
    "add-experts": f"add-experts {{MOE4}} {{OUT}} --expert code={{MA}} --calibration code={{a_txt}} {CAL}",
    "add-experts-average": (f"add-experts {{MOE4}} {{OUT}} --expert code={{MA}} --calibration code={{a_txt}} {CAL} "
                            "--expert prose={MB} --calibration prose={b_txt} --non-ffn average"),
    "copy-fused": "copy {MOE4} {OUT} --layout fused",
    "copy-bf16-shards": "copy {DEMO} {OUT} --dtype bf16 --max-shard-size 1MB",
    "copy-topk": "copy {MOE4} {OUT} --top-k 1",
}
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def side_env(checkout: Path) -> dict:
    path = os.pathsep.join(p for p in (str(checkout), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **ENV, "PYTHONPATH": path}


def run(checkout: Path, args: list[str], log: Path) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS MiB) of `python -m surgery ARGS` run with the checkout's code.

    The peak is /usr/bin/time's (as bench/common.timed): os.wait4 of a child forked from this process would
    report at least this process's own RSS (the high-water mark survives exec), not the command's."""
    usage = log.with_suffix(".time")
    with open(log, "w") as out:
        started = time.perf_counter()
        code = subprocess.run(["/usr/bin/time", "-v", "-o", str(usage), sys.executable, "-m", "surgery", *args],
                              cwd=checkout, env=side_env(checkout), stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - started
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", usage.read_text())
    return code, wall, int(match.group(1)) / 1024 if match else float("nan")


def check_import(checkout: Path) -> None:
    found = subprocess.run([sys.executable, "-c", "import surgery; print(surgery.__file__)"], cwd=checkout,
                           env=side_env(checkout), check=True, capture_output=True, text=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(checkout.resolve()):
        raise SystemExit(f"{checkout}: `import surgery` found {found}, outside the checkout")
    print(f"  {checkout}: surgery from {found}", file=sys.stderr)


def checkout(rev: str, directory: Path) -> Path:
    """A fresh `git worktree` of rev at directory (one left by an earlier --keep run removed first)."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(directory)], capture_output=True)
    shutil.rmtree(directory, ignore_errors=True)
    git("worktree", "add", "-f", "--detach", str(directory), rev)
    return directory


def perturbed(demo: Path, out: Path, seed: int) -> Path:
    """The demo with NOISE x std x N(0, 1) added to every float tensor (seeded), tokenizer and configs copied."""
    import torch
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(demo / "model.safetensors")
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.is_floating_point():
            std = tensor.float().std().item() if tensor.numel() > 1 else 0.0
            noise = torch.randn(tensor.shape, generator=generator) * (NOISE * (std or 1.0))
            tensors[name] = (tensor.float() + noise).to(tensor.dtype).contiguous()
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy2(demo / name, out / name)
    return out


def as_mistral(dense: Path, out: Path) -> Path:
    """A copy of a dense Llama whose config says Mistral (same tensors): add-experts takes experts of the dense
    family `surgery extract` writes, and a Mixtral's is Mistral."""
    shutil.copytree(dense, out)
    config = json.loads((dense / "config.json").read_text())
    for key in ("mlp_bias", "pretraining_tp", "transformers_version"):
        config.pop(key, None)
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def build_inputs(base: Path, inputs: Path) -> dict[str, str]:
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    demo = shutil.copytree(base / "examples" / "demo-llama", inputs / "demo-llama")
    paths = {"DEMO": demo, "SEED": demo}
    lines = (base / "surgery" / "data" / "sample.txt").read_text().splitlines(keepends=True)
    third = -(-len(lines) // 3)
    for number, domain in enumerate("abc"):
        paths[f"{domain}_txt"] = inputs / f"{domain}.txt"
        paths[f"{domain}_txt"].write_text("".join(lines[number * third:(number + 1) * third]))
        paths[domain.upper()] = perturbed(demo, inputs / domain, seed=number + 1)
        paths[f"M{domain.upper()}"] = as_mistral(paths[domain.upper()], inputs / f"mistral-{domain}")
    for key, name, extra in (("MOE4", "moe4", "--seed 1"),
                             ("MOEQWEN", "moe-qwen", "--format qwen2_moe --shared-expert")):
        paths[key] = inputs / name
        args = ["upcycle", str(demo), str(paths[key]), "-n", "4", "-k", "2", "--noise", "0.05", *extra.split()]
        code, _, _ = run(base, args, inputs / f"{name}.log")
        if code:
            raise SystemExit(f"building {name} failed ({code}):\n{(inputs / f'{name}.log').read_text()[-3000:]}")
    return {key: str(value) for key, value in paths.items()}


def digests(out: Path) -> dict[str, str]:
    if not out.is_dir():
        return {}
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST}


def compare(base: dict, head: dict) -> tuple[list[str], list[str]]:
    """(shards that differ or exist on one side only, other files likewise)."""
    differ = sorted(name for name in set(base) | set(head) if base.get(name) != head.get(name))
    return [n for n in differ if n.endswith(".safetensors")], [n for n in differ if not n.endswith(".safetensors")]


def tail(log: Path) -> str:
    return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])


def shard_parts(path: Path) -> tuple[dict, dict, bytes]:
    """(header metadata, tensor entries, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    return header.pop("__metadata__", {}), header, raw[8 + size:]


def why(base: Path, head: Path) -> str:
    """Where two shards differ: the tensor bytes, or only the header's metadata (which keys)."""
    if not (base.is_file() and head.is_file()):
        return f"{base.name}: only in {'base' if base.is_file() else 'head'}"
    (base_meta, base_entries, base_data), (head_meta, head_entries, head_data) = shard_parts(base), shard_parts(head)
    if base_entries != head_entries or base_data != head_data:
        return f"{base.name}: tensors"
    keys = sorted(k for k in set(base_meta) | set(head_meta) if base_meta.get(k) != head_meta.get(k))
    return f"{base.name}: metadata {', '.join(keys) or '(layout)'} only"


def run_case(name: str, sides: dict[str, Path], paths: dict[str, str], work: Path, keep: bool,
             repeat: int = 1) -> tuple[bool, list]:
    """Run one case on both sides ``repeat`` times, alternating base and head; every round's bytes are compared."""
    walls, peaks = {side: [] for side in sides}, {side: [] for side in sides}
    hashes, outs, codes = {}, {}, {}
    verdict, others = "yes", []
    for round_number in range(repeat):
        for side, checkout_dir in sides.items():
            outs[side] = out = work / "out" / side / name
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            args = [token.format(OUT=out, **paths) for token in CASES[name].split()]
            log = work / "logs" / f"{side}-{name}.log"
            codes[side], wall, peak = run(checkout_dir, args, log)
            walls[side].append(wall)
            peaks[side].append(peak)
            hashes[side] = digests(out)
            if codes[side]:
                print(f"  {name} ({side}) exited {codes[side]}:\n{tail(log)}", file=sys.stderr)
        shards, others = compare(hashes["base"], hashes["head"])
        count = sum(n.endswith(".safetensors") for n in hashes["base"])
        if codes["base"] or codes["head"]:
            verdict, others = f"NO (exit {codes['base']} / {codes['head']})", []
        elif shards:
            verdict = f"NO ({'; '.join(why(outs['base'] / n, outs['head'] / n) for n in shards)})"
        elif not count:
            verdict = "NO (no shards)"
        if not keep or round_number < repeat - 1:
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
        if verdict != "yes":
            break
    row = [name, count, verdict, ", ".join(others) or "-",
           f"{statistics.median(walls['base']):.1f} / {statistics.median(walls['head']):.1f}",
           f"{max(peaks['base']):.0f} / {max(peaks['head']):.0f}"]
    print(f"  {' | '.join(str(cell) for cell in row)}", file=sys.stderr, flush=True)
    return verdict == "yes", row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision of the reference code")
    parser.add_argument("--head", default="WORKTREE", help="git revision, or WORKTREE: the repository as it is")
    parser.add_argument("--workdir", default="/tmp/identical", help="worktrees, inputs, outputs and logs")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=list(CASES), help="run just these cases")
    parser.add_argument("--keep", action="store_true", help="keep the worktrees and every output")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run each case N times per side, alternating (median wall, worst peak RSS)")
    args = parser.parse_args()
    work = Path(args.workdir).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base_rev = git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    head_rev = "WORKTREE" if args.head == "WORKTREE" else git("rev-parse", "--verify", f"{args.head}^{{commit}}")
    try:
        sides = {"base": checkout(base_rev, work / "base")}
        sides["head"] = REPO if head_rev == "WORKTREE" else checkout(head_rev, work / "head")
        for checkout_dir in sides.values():
            check_import(checkout_dir)
        print(f"building inputs in {work / 'inputs'}", file=sys.stderr, flush=True)
        paths = build_inputs(sides["base"], work / "inputs")
        rows, failures = [], 0
        for name in args.only or CASES:
            ok, row = run_case(name, sides, paths, work, args.keep, args.repeat)
            rows.append(row)
            failures += not ok
    finally:
        if not args.keep:
            for side in ("base", "head"):
                if (work / side).exists():
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / side)],
                                   capture_output=True)
    head_label = "the working tree" if head_rev == "WORKTREE" else head_rev[:10]
    print(f"## Output bytes: base {base_rev[:10]} vs head {head_label}\n")
    timing = "median " if args.repeat > 1 else ""
    headers = ["case", "shards", "identical", "other files that differ", f"base s / head s ({timing}wall)",
               f"base MiB / head MiB ({'worst ' if args.repeat > 1 else ''}peak RSS)"]
    print("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
    print("\n".join("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows))
    print(f"\n{len(rows)} cases, {args.repeat} run(s) per side each, alternating base and head, in "
          f"{time.perf_counter() - started:.0f} s; wall time and peak RSS of each child process.")
    print("ALL IDENTICAL" if not failures else f"DIFFERENCES: {failures} case(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
