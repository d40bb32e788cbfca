"""`surgery prune` at scale: 50 % of a Qwen3-30B-A3B- or DeepSeek-V3-shaped synthetic MoE with REAP calibration,
peak RSS and time.

    python bench/bench_prune_scale.py [--layers 12] [--tokens 512] [--workdir DIR]
    python bench/bench_prune_scale.py --family deepseek_v3 --layers 4 --experts 64
    python bench/bench_prune_scale.py --family llama4_text --layers 3 --experts 16 --memory-budget 3GiB
    python bench/bench_prune_scale.py --family deepseek_v3 --layers 4 --experts 64 --fp8

The Qwen3-MoE (synthetic weights, bf16): hidden 2048, 32 heads of 128, 4 KV heads, 128 experts of FFN 768, top-8,
vocabulary 151936, `--layers` layers (12: about 16 GB). The DeepSeek-V3 slice: DeepSeek-V3's real widths (hidden
7168, 128 MLA heads with q_lora_rank 1536 / kv_lora_rank 512, experts of FFN 2048, one shared expert, vocabulary
129280, top-8 with group-limited routing over 8 groups, 4 used), `--experts` routed experts (a multiple of 8) and
`--layers` layers of which the first is dense (FFN 18432): 4 layers of 64 experts are about 22 GB. The Llama-4-Scout
slice: its text model's widths (hidden 5120, 40 heads of 128, 8 KV heads, `--experts` experts of FFN 8192 stored
fused, top-1, one shared expert of 8192, vocabulary 202048), every layer MoE: 3 layers of 16 experts are about 17 GB.
With `--fp8` the model is stored as DeepSeek-V3 publishes it (F8_E4M3 weights with F32 128 x 128 block scales;
norms, routers, embedding and head in bf16): about half the bytes; the prune keeps the kept experts' values and
scales as byte copies and the calibration dequantizes one layer at a time. `surgery prune --ratio 0.5 --criterion reap` scores
every expert on `--tokens` pseudo-random calibration token ids through the layer-streaming runner
(bfloat16 compute) and writes the kept half as byte copies (`--save-scores`). Then the write alone (the same
prune from the saved scores, no model run) against the I/O floor of the same bytes (`cp -r` of the pruned
checkpoint: read once, written once), each after a sync and, where permitted, with the page cache dropped, so
that both read from disk; and a second floor, the plan's own byte ranges (the kept experts, spread over the source's
shards) copied in the writer's order by a bare loop of `os.copy_file_range` (bench/copy_ranges.py), which shows what
the read pattern alone costs. Measured with /usr/bin/time -v. The models are deleted after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

from common import REPO, dir_bytes, drop_caches, make_synthetic_llama, markdown_table, surgery_command, timed

sys.path.insert(0, str(REPO))


def config(layers: int) -> dict:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
            "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
            "vocab_size": 151936, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
            "intermediate_size": 6144, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "rope_theta": 1000000.0, "bos_token_id": 1, "eos_token_id": 2}


def deepseek_config(layers: int, experts: int) -> dict:
    return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
            "num_hidden_layers": layers, "num_attention_heads": 128, "num_key_value_heads": 128, "vocab_size": 129280,
            "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
            "v_head_dim": 128, "head_dim": 64, "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "n_routed_experts": experts, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8,
            "topk_group": 4, "first_k_dense_replace": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
            "num_nextn_predict_layers": 0, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False, "rope_theta": 10000.0, "bos_token_id": 0, "eos_token_id": 1}


def llama4_config(layers: int, experts: int) -> dict:
    """Llama-4-Scout's text model at its real widths (every layer MoE, top-1, one shared expert), `experts` routed."""
    return {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "hidden_size": 5120,
            "num_hidden_layers": layers, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
            "vocab_size": 202048, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
            "num_local_experts": experts, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1,
            "attention_chunk_size": 8192, "use_qk_norm": True, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "rope_theta": 500000.0, "bos_token_id": 1, "eos_token_id": 2}


CONFIGS = {"qwen3_moe": lambda layers, experts: config(layers), "deepseek_v3": deepseek_config,
           "llama4_text": llama4_config}


def planned_spans(source: Path, scores: Path) -> list:
    """[file, offset, count] of every byte copy the prune from `scores` plans, in the order the writer copies them."""
    from copy_ranges import plan_spans

    import surgery

    result = surgery.prune(str(source), str(source.parent / "unwritten"), ratio=0.5, criterion="reap",
                           scores=str(scores), dry_run=True)
    return plan_spans(result.plan)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=tuple(CONFIGS), default="qwen3_moe")
    parser.add_argument("--experts", type=int, default=64, help="Routed experts per layer (deepseek_v3, llama4_text).")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=1, help="Alternating runs of the write alone and the floor.")
    parser.add_argument("--memory-budget", default=None,
                        help="The prune's --memory-budget (default: surgery's own, a share of the free memory).")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--fp8", action="store_true",
                        help="Store the model as DeepSeek-V3 publishes it: FP8 with 128 x 128 block scales.")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-prune-scale-", dir=args.workdir))
    try:
        shape = CONFIGS[args.family](args.layers, args.experts)
        source = make_synthetic_llama(work / "moe", shape, dtype="BF16", family=args.family,
                                      fp8_block=128 if args.fp8 else None)
        vocab = shape["vocab_size"]
        size = dir_bytes(source)
        ids = work / "calibration.jsonl"
        generator = random.Random(0)
        ids.write_text("".join(json.dumps([generator.randrange(3, vocab) for _ in range(256)]) + "\n"
                               for _ in range(max(1, args.tokens // 256))))
        out, scores = work / "pruned", work / "scores.json"
        wall, rss, _ = timed([str(c) for c in surgery_command(
            "prune", source, out, "--ratio", 0.5, "--criterion", "reap", "--calibration", ids,
            "--calibration-tokens", args.tokens, "--compute-dtype", "bfloat16", "--device", "cpu",
            "--save-scores", scores, *(("--memory-budget", args.memory_budget) if args.memory_budget else ()))])
        written = dir_bytes(out)
        # The write alone: the same pruning from the saved scores (no model run), against the I/O floor of the
        # same bytes: `cp` of the pruned checkpoint (every byte read once and written once), after a sync each.
        shutil.rmtree(out)
        spans = work / "spans.json"  # the plan's byte copies, for the second floor (bench/copy_ranges.py)
        spans.write_text(json.dumps(planned_spans(source, scores)))
        best_write, best_floor, best_ranges = None, None, None
        for _ in range(args.repeats):  # alternating, best of each: the disk's speed drifts between runs
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(work / "floor", ignore_errors=True)
            cold = drop_caches()
            run = timed([str(c) for c in surgery_command(
                "prune", source, out, "--ratio", 0.5, "--criterion", "reap", "--scores", scores)])
            drop_caches()
            floor = timed(["cp", "-r", str(out), str(work / "floor")])
            shutil.rmtree(work / "floor", ignore_errors=True)
            drop_caches()
            ranges = timed([sys.executable, str(REPO / "bench" / "copy_ranges.py"), str(spans), str(work / "ranges")])
            (work / "ranges").unlink()
            os.sync()
            best_write = run if best_write is None or run[0] < best_write[0] else best_write
            best_floor = floor if best_floor is None or floor[0] < best_floor[0] else best_floor
            best_ranges = ranges if best_ranges is None or ranges[0] < best_ranges[0] else best_ranges
        (write_wall, write_rss, _), (floor_wall, floor_rss, _) = best_write, best_floor
        ranges_wall, ranges_rss, _ = best_ranges
        rows = [[f"prune --ratio 0.5 --criterion reap ({args.tokens} tokens)", f"{size / 1e9:.1f}",
                 f"{written / 1e9:.1f}", f"{wall:.0f}", f"{rss:.0f}", ""],
                ["prune --ratio 0.5 --scores FILE (the write alone)", f"{size / 1e9:.1f}", f"{written / 1e9:.1f}",
                 f"{write_wall:.1f}", f"{write_rss:.0f}", f"{floor_wall / write_wall:.2f}"],
                ["I/O floor: cp -r of the pruned checkpoint", f"{written / 1e9:.1f}", f"{written / 1e9:.1f}",
                 f"{floor_wall:.1f}", f"{floor_rss:.0f}", "1.00"],
                ["the plan's byte ranges by a bare copy_file_range loop (bench/copy_ranges.py)", f"{size / 1e9:.1f}",
                 f"{written / 1e9:.1f}", f"{ranges_wall:.1f}", f"{ranges_rss:.0f}", f"{floor_wall / ranges_wall:.2f}"]]
        print(markdown_table(["run", "input GB", "output GB", "wall s", "peak RSS MiB", "floor / run (wall)"], rows))
        print(f"\nBest of {args.repeats} alternating runs each. Both the write alone and cp start after a sync, {'with the page cache dropped (both read from disk)' if cold else 'with a warm page cache (dropping it was not permitted)'}.")
        what = {"qwen3_moe": "Qwen3-MoE", "deepseek_v3": f"DeepSeek-V3 slice ({args.experts} experts)",
                "llama4_text": f"Llama-4-Scout text slice ({args.experts} experts)"}[args.family]
        print(f"\nSynthetic {what}, {args.layers} layers, {'FP8 (128 x 128 block scales)' if args.fp8 else 'bf16'}; target: peak RSS <= 4 GiB: "
              f"{'PASS' if rss <= 4096 else 'FAIL'} ({rss:.0f} MiB); the write alone at "
              f"{floor_wall / write_wall:.2f} of the I/O floor's speed ({written / write_wall / 1e6:.0f} vs "
              f"{written / floor_wall / 1e6:.0f} MB/s), and at {ranges_wall / write_wall:.2f} of a bare copy of the "
              f"same byte ranges (the read pattern alone: {floor_wall / ranges_wall:.2f} of cp)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
