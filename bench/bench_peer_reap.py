"""`surgery prune --criterion reap` against llm-compressor 0.14's `REAPPruningModifier`, on equal work.

    python bench/bench_peer_reap.py [--rounds 3] [--venv /tmp/llmc-venv] [--workdir DIR] [--dtype bfloat16|float32]
                                    [--peer both|default|routed|none]

The model: a random Qwen3-MoE built by transformers' own `Qwen3MoeForCausalLM` from a config (seed 0, every expert
its own random weights), saved with `save_pretrained` in bf16 (fused experts, as transformers 5 saves them): hidden
1024, 8 layers, 16 heads of 128, 4 KV heads, 64 experts of FFN 200, top-8 (`norm_topk_prob`), vocabulary chosen so
that the checkpoint is about 842 MB. A word-level tokenizer sits beside it only because llm-compressor's `oneshot`
loads a processor whenever it is given a dataset; neither tool tokenizes anything: both read the same 2048 token ids
(16 rows of 128, seeded).

Both compute in `--dtype`: bfloat16 (default: llm-compressor runs the model in its stored bf16, `precision="auto"`)
or float32 (`precision="float32"`). Ours: `surgery prune MODEL OUT --ratio 0.5 --criterion reap --calibration
ids.jsonl --calibration-tokens 2048 --compute-dtype DTYPE --save-scores s.json`.
Theirs, in its own virtualenv (`python -m venv /tmp/llmc-venv && /tmp/llmc-venv/bin/pip install torch==2.13.0 &&
/tmp/llmc-venv/bin/pip install llmcompressor==0.14.0.1`): `oneshot(model=MODEL, dataset=Dataset(input_ids,
attention_mask), recipe=REAPPruningModifier(sparsity=0.5), num_calibration_samples=16, max_seq_length=128,
batch_size=1, pipeline="basic", output_dir=OUT, precision=...)`; "basic" runs the whole unpruned model on every
sample and prunes at the end, so both score on the unpruned model's hidden states (its default sequential pipeline
scores layer l+1 on the pruned layers' outputs). Both write the pruned checkpoint. Their call as it is published
(`moe_calibrate_all_experts` left at its default, True: every expert runs on every token, the routed tokens' norms
picked out) and with `moe_calibrate_all_experts=False` (only the routed tokens, as ours): the second is the equal
work, the first the peer as people run it.

Each run under /usr/bin/time -v, interleaved (the tools' order alternates from round to round), `--rounds` rounds.
The kept experts: ours from the output's safetensors metadata (`surgery_prune`); theirs from the router rows of
their saved checkpoint, matched row by row to the source's router (and checked against their `report_path` JSON).
Prints a markdown table and whether the kept experts agree; writes nothing else (the model and outputs live in a
temporary directory, or in `--workdir`, where the model is kept for the next run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, dir_bytes, markdown_table, save_word_tokenizer, surgery_command, timed

TARGET_BYTES = 842e6
ROWS, LENGTH = 16, 128
SHAPE = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
             num_experts=64, num_experts_per_tok=8, moe_intermediate_size=200, intermediate_size=2048,
             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096,
             tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)

PEER = r'''
import json, sys
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.reap import REAPPruningModifier

model, ids, out, report, all_experts, precision = sys.argv[1:7]
rows = [json.loads(line) for line in open(ids)]
dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]})
extra = {} if all_experts == "default" else {"moe_calibrate_all_experts": False}
oneshot(model=model, dataset=dataset, recipe=REAPPruningModifier(sparsity=0.5, report_path=report),
        num_calibration_samples=16, max_seq_length=128, batch_size=1, pipeline="basic", output_dir=out,
        precision=precision, **extra)
'''


def qwen3_moe_config(vocab: int):
    from transformers import Qwen3MoeConfig  # lazy: not for --help

    return Qwen3MoeConfig(vocab_size=vocab, **SHAPE)


def bf16_bytes(vocab: int) -> int:
    import torch  # lazy: not for --help
    from transformers import Qwen3MoeForCausalLM  # lazy: not for --help

    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(qwen3_moe_config(vocab))
    return 2 * sum(parameter.numel() for parameter in model.parameters())


def make_model(directory: Path) -> int:
    """The random Qwen3-MoE (see the module doc) in `directory`, unless it is there already; returns its vocabulary."""
    import torch  # lazy: not for --help
    from transformers import Qwen3MoeForCausalLM  # lazy: not for --help

    per_token = 2 * 2 * SHAPE["hidden_size"]  # one row of the embedding and one of the head, bf16
    fixed = bf16_bytes(64) - 64 * per_token
    vocab = int((TARGET_BYTES - fixed) // per_token) // 64 * 64
    if (directory / "config.json").exists():
        return json.loads((directory / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(qwen3_moe_config(vocab)).eval()
    experts = model.model.layers[0].mlp.experts.gate_up_proj
    if torch.equal(experts[0], experts[1]):
        raise AssertionError("the random experts are not distinct")
    model.to(torch.bfloat16).save_pretrained(directory)
    save_word_tokenizer(directory, vocab)
    return vocab


def surgery_kept(out: Path) -> dict[int, list[int]]:
    from safetensors import safe_open  # lazy: not for --help

    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            details = (handle.metadata() or {}).get("surgery_prune")
        if details:
            return {int(layer): entry["kept"] for layer, entry in json.loads(details)["layers"].items()}
    raise AssertionError(f"{out}: no surgery_prune metadata")


def router_rows(directory: Path) -> dict[int, object]:
    from safetensors import safe_open  # lazy: not for --help

    rows = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            for name in handle.keys():
                if name.endswith("mlp.gate.weight"):
                    rows[int(name.split(".")[2])] = handle.get_tensor(name)
    return rows


def peer_kept(source: Path, out: Path, report: Path) -> dict[int, list[int]]:
    """Their kept experts: each router row of their output found among the source's rows; checked against the
    retained indices their REAPPruningModifier reports."""
    import torch  # lazy: not for --help

    before, after = router_rows(source), router_rows(out)
    kept = {}
    for layer, rows in after.items():
        matches = [[e for e in range(before[layer].shape[0]) if torch.equal(row, before[layer][e])] for row in rows]
        if any(len(found) != 1 for found in matches):
            raise AssertionError(f"layer {layer}: a router row of their output is not one of the source's")
        kept[layer] = [found[0] for found in matches]
    reported = {int(name.split(".")[2]): experts for name, experts in json.loads(report.read_text()).items()}
    if reported != kept:
        raise AssertionError(f"their report {reported} differs from their router rows {kept}")
    return kept


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--venv", default="/tmp/llmc-venv")
    parser.add_argument("--workdir", default=None, help="Keep the model here between runs (default: a temporary "
                                                         "directory, deleted after).")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="What both compute in: ours --compute-dtype, theirs precision (bfloat16: 'auto', the "
                             "stored dtype, as published).")
    parser.add_argument("--peer", choices=("both", "default", "routed", "none"), default="both",
                        help="Which llm-compressor calls to run: its default moe_calibrate_all_experts=True, "
                             "False (routed tokens only), both, or none.")
    args = parser.parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-peer-reap-"))
    work.mkdir(parents=True, exist_ok=True)
    python = Path(args.venv) / "bin" / "python"
    try:
        model = work / "qwen3-moe"
        vocab = make_model(model)
        generator = random.Random(0)
        rows = [[generator.randrange(3, vocab) for _ in range(LENGTH)] for _ in range(ROWS)]
        ids = work / "ids.jsonl"
        ids.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (work / "peer.py").write_text(PEER)
        ours_out, scores = work / "ours", work / "scores.json"
        ours_cmd = [str(c) for c in surgery_command(
            "prune", model, ours_out, "--ratio", 0.5, "--criterion", "reap", "--calibration", ids,
            "--calibration-tokens", ROWS * LENGTH, "--compute-dtype", args.dtype, "--save-scores", scores,
            "--force")]
        variants = {"default": "llm-compressor (moe_calibrate_all_experts=True, its default)",
                    "routed": "llm-compressor (moe_calibrate_all_experts=False)"}
        peers = [v for v in variants if args.peer in (v, "both")]
        times: dict[str, list] = {"ours": [], **{v: [] for v in peers}}
        kept: dict[str, dict] = {}
        for number in range(args.rounds):
            order = ["ours", *peers] if number % 2 == 0 else [*peers, "ours"]
            for who in order:
                load = os.getloadavg()[0]
                if who == "ours":
                    shutil.rmtree(ours_out, ignore_errors=True)
                    wall, rss, _ = timed(ours_cmd, env={"PYTHONPATH": str(REPO)})
                    kept["ours"] = surgery_kept(ours_out)
                else:
                    out, report = work / f"peer-{who}", work / f"peer-{who}.json"
                    shutil.rmtree(out, ignore_errors=True)
                    wall, rss, _ = timed([str(python), str(work / "peer.py"), str(model), str(ids), str(out),
                                          str(report), who, "auto" if args.dtype == "bfloat16" else args.dtype],
                                         env={"PYTHONPATH": ""})
                    kept[who] = peer_kept(model, out, report)
                times[who].append((wall, rss, load))
                print(f"round {number + 1}: {who} {wall:.1f} s, {rss:.0f} MiB (load before {load:.2f})",
                      file=sys.stderr, flush=True)
        table = []
        for number in range(args.rounds):
            ours = times["ours"][number]
            table.append([f"{number + 1}", "surgery prune", f"{ours[0]:.1f}", f"{ours[1]:.0f}", "", f"{ours[2]:.2f}"])
            for who in peers:
                wall, rss, load = times[who][number]
                table.append([f"{number + 1}", variants[who], f"{wall:.1f}", f"{rss:.0f}",
                              f"{ours[0] / wall:.2f} / {ours[1] / rss:.2f}", f"{load:.2f}"])
        best = {who: (min(t[0] for t in runs), min(t[1] for t in runs)) for who, runs in times.items()}
        table.append(["best", "surgery prune", f"{best['ours'][0]:.1f}", f"{best['ours'][1]:.0f}", "", ""])
        for who in peers:
            table.append(["best", variants[who], f"{best[who][0]:.1f}", f"{best[who][1]:.0f}",
                          f"{best['ours'][0] / best[who][0]:.2f} / {best['ours'][1] / best[who][1]:.2f}", ""])
        print(markdown_table(["run", "tool", "wall s", "peak RSS MiB", "ours / theirs (wall / RSS)",
                              "load avg before"], table))
        print(f"\nModel: random Qwen3-MoE, {dir_bytes(model) / 1e6:.0f} MB bf16 (vocabulary {vocab}); "
              f"{ROWS * LENGTH} calibration tokens ({ROWS} x {LENGTH}); both compute in {args.dtype} (ours "
              f"--compute-dtype {args.dtype}, theirs precision={'auto' if args.dtype == 'bfloat16' else args.dtype}).")
        for who in peers:
            differ = {layer: (kept["ours"][layer], kept[who][layer]) for layer in kept["ours"]
                      if kept["ours"][layer] != kept[who].get(layer)}
            agree = "the same kept experts in every layer" if not differ else \
                f"kept experts differ in {len(differ)} of {len(kept['ours'])} layers: " + "; ".join(
                    f"layer {layer}: ours only {sorted(set(a) - set(b))}, theirs only {sorted(set(b) - set(a))}"
                    for layer, (a, b) in sorted(differ.items()))
            print(f"- ours vs {variants[who]}: {agree}")
        print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
