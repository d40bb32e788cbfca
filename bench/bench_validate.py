"""`surgery validate` throughput on CPU against a plain transformers forward loop over the same batches.

    python bench/bench_validate.py            # ~100M-parameter Mixtral (8 experts, top-2), 4096 tokens
    python bench/bench_validate.py --quick    # ~2M parameters, 512 tokens (well under a minute)
    python bench/bench_validate.py --tolerances [--quick]   # the measurements behind docs/validate.md

The checkpoint is a Mixtral with random weights built from a config into a temp dir (not committed).
Baseline: AutoModelForCausalLM.from_pretrained (transformers defaults) and, under torch.no_grad,
``model(input_ids=..., attention_mask=...)`` per batch, nothing else. validate additionally checks
the structure, loads strictly (eager experts on CPU), checks the weights are finite, computes the
loss and routing statistics. Both are timed in the same process, interleaved, best of --repeat;
"eval" is the batch loop only, "end to end" includes loading. Target (issue 3): validate within
1.3x of the forward loop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, markdown_table

sys.path.insert(0, str(REPO))

FULL = dict(vocab_size=32000, hidden_size=512, intermediate_size=640, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, batch_size=8, seq_len=256, batches=2)
QUICK = dict(vocab_size=4096, hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, batch_size=4, seq_len=64, batches=2)


def build(directory: Path, settings: dict) -> int:
    import torch
    import transformers

    keys = {k: v for k, v in settings.items() if k not in ("batch_size", "seq_len", "batches")}
    config = transformers.MixtralConfig(**keys, max_position_embeddings=1024, tie_word_embeddings=False,
                                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def token_file(path: Path, settings: dict) -> Path:
    import numpy as np

    rows = settings["batch_size"] * settings["batches"]
    ids = np.random.RandomState(0).randint(3, settings["vocab_size"], size=(rows, settings["seq_len"]))
    np.save(path, ids)
    return path


def forward_loop(directory: Path, tokens: Path, settings: dict) -> tuple[float, float, int]:
    """(end-to-end s, eval s, tokens) of the plain transformers loop."""
    import numpy as np
    import torch
    import transformers

    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    ids = torch.from_numpy(np.load(tokens))
    loaded = time.perf_counter()
    count = 0
    with torch.no_grad():
        for start in range(0, ids.shape[0], settings["batch_size"]):
            batch = ids[start:start + settings["batch_size"]]
            model(input_ids=batch, attention_mask=torch.ones_like(batch))
            count += batch.numel()
    done = time.perf_counter()
    return done - started, done - loaded, count


def run_validate(directory: Path, tokens: Path, settings: dict) -> tuple[float, float, int]:
    from surgery.checks.validation import validate

    started = time.perf_counter()
    result = validate(directory, tokens=tokens, batch_size=settings["batch_size"], seq_len=settings["seq_len"],
                      device="cpu")
    total = time.perf_counter() - started
    return total, result["timing"]["eval_seconds"], result["sample"]["tokens"]


def tolerance_rows(quick: bool) -> list[list]:
    """The largest relative difference the layer-by-layer comparison (--verify, --expect-exact) sees
    between an exact MoE rewrite and its dense source, per compute dtype: the rounding noise its
    tolerance must allow (docs/validate.md); and what it sees for a real error of 1 % and 10 %."""
    import copy

    import torch
    import transformers

    from surgery.io.checkpoint import Checkpoint
    from surgery.checks.compare import compare_layers
    from surgery.execution.settings import RunSettings
    from surgery.execution.weights import ModelWeights
    from surgery.execution.batches import batches

    shapes = [(128, 4, 344, 512)] if quick else [(128, 4, 344, 512), (256, 8, 688, 2000), (256, 24, 688, 2000)]
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-tolerance-"))
    try:
        for hidden, layers, ffn, vocab in shapes:
            config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                              num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64,
                                              intermediate_size=ffn, tie_word_embeddings=False)
            torch.manual_seed(0)
            dense = transformers.LlamaForCausalLM(config).eval()
            with torch.no_grad():  # trained-model scale: every matrix ~ N(0, 1/fan_in), norms near 1
                for name, parameter in dense.named_parameters():
                    if parameter.dim() == 2:
                        parameter.normal_(0, parameter.shape[1] ** -0.5)
                    else:
                        parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            dense.save_pretrained(work / "dense")
            ids = torch.randint(0, vocab, (8, 64), generator=torch.Generator().manual_seed(1)).tolist()
            sample = list(batches(ids, 4, 64))
            variants = [("upcycle 8 experts top-2", moe_rewrite(dense, 8, 2, "upcycle")),
                        ("split 8 experts top-8", moe_rewrite(dense, 8, 8, "split"))]
            for error in (0.01, 0.1):
                broken = copy.deepcopy(variants[0][1])
                with torch.no_grad():
                    broken.model.layers[layers // 2].mlp.experts.down_proj[0] *= 1 + error
                variants.append((f"upcycle, one expert of one layer {error:.0%} off", broken))
            for label, moe in variants:
                moe.save_pretrained(work / "moe")
                cells = [f"hidden {hidden}, {layers} layers", label]
                with Checkpoint.open(work / "moe") as a, Checkpoint.open(work / "dense") as b:
                    for dtype in ("float32", "bfloat16", "float16"):
                        report = compare_layers(ModelWeights.from_checkpoint(a), ModelWeights.from_checkpoint(b),
                                                sample, RunSettings("cpu", dtype=dtype), dtype)
                        cells.append(f"{report['max_relative']:.2g}")
                rows.append(cells)
                shutil.rmtree(work / "moe")
            shutil.rmtree(work / "dense")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def moe_rewrite(dense, experts: int, top_k: int, mode: str):
    """An exact Mixtral rewrite of a dense Llama, in memory: experts = FFN copies (upcycle, any router)
    or a neuron partition with down_proj scaled by N under a zero router and top_k = N (split)."""
    import torch
    import transformers

    source = {k: v for k, v in dense.config.to_dict().items() if k not in ("architectures", "model_type")}
    ffn = source["intermediate_size"]
    size = ffn if mode == "upcycle" else ffn // experts
    config = transformers.MixtralConfig(**{**source, "intermediate_size": size, "num_local_experts": experts,
                                           "num_experts_per_tok": top_k, "sliding_window": None})
    moe = transformers.MixtralForCausalLM(config)
    weights = dense.state_dict()
    state = {name: weights[name] for name in moe.state_dict() if name in weights}
    generator = torch.Generator().manual_seed(0)
    for layer in range(config.num_hidden_layers):
        gate, up, down = (weights[f"model.layers.{layer}.mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
        if mode == "upcycle":
            gate_up = torch.cat([gate, up]).expand(experts, -1, -1).clone()
            down_proj = down.expand(experts, -1, -1).clone()
            router = 0.02 * torch.randn(experts, config.hidden_size, generator=generator)
        else:
            parts = torch.randperm(ffn, generator=generator).reshape(experts, size)
            gate_up = torch.stack([torch.cat([gate[p], up[p]]) for p in parts])
            down_proj = torch.stack([down[:, p] * experts for p in parts])
            router = torch.zeros(experts, config.hidden_size)
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = gate_up
        state[f"model.layers.{layer}.mlp.experts.down_proj"] = down_proj
        state[f"model.layers.{layer}.mlp.gate.weight"] = router
    moe.load_state_dict(state, strict=True)
    moe.set_experts_implementation("eager")
    return moe.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--tolerances", action="store_true",
                        help="measure the rounding noise of exact MoE rewrites per dtype instead of throughput")
    args = parser.parse_args()
    if args.tolerances:
        print("\nlargest relative difference ‖Δ‖/‖dense‖ over every layer's attention, FFN/MoE and output, the "
              "embedding and the logits: exact MoE rewrite vs its dense source, both run in the dtype "
              "(random weights at trained scale, 8x64 random tokens, CPU)\n")
        print(markdown_table(["model", "rewrite", "float32", "bfloat16", "float16"], tolerance_rows(args.quick)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    from surgery import console

    console.VERBOSITY["level"] = -1
    transformers.utils.logging.disable_progress_bar()
    settings = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="bench-validate-", dir=args.workdir))
    try:
        parameters = build(work / "model", settings)
        tokens = token_file(work / "ids.npy", settings)
        forward_loop(work / "model", tokens, settings)  # warm-up: lazy imports, page cache
        run_validate(work / "model", tokens, settings)
        loops, validates = [], []
        for _ in range(args.repeat):  # interleaved, so that load from other processes hits both alike
            loops.append(forward_loop(work / "model", tokens, settings))
            validates.append(run_validate(work / "model", tokens, settings))
        count = loops[0][2]
        assert all(v[2] == count for v in validates), "validate evaluated another number of tokens"
        loop_total, loop_eval = min(r[0] for r in loops), min(r[1] for r in loops)
        val_total, val_eval = min(r[0] for r in validates), min(r[1] for r in validates)
        rows = [
            ["transformers forward loop", f"{loop_eval:.2f}", f"{count / loop_eval:.0f}", "1.00",
             f"{loop_total:.2f}", "1.00"],
            ["surgery validate", f"{val_eval:.2f}", f"{count / val_eval:.0f}", f"{val_eval / loop_eval:.2f}",
             f"{val_total:.2f}", f"{val_total / loop_total:.2f}"],
        ]
        print(f"\nMixtral, {parameters / 1e6:.1f}M parameters ({settings['num_hidden_layers']} layers, hidden "
              f"{settings['hidden_size']}, {settings['num_local_experts']} experts top-{settings['num_experts_per_tok']}, "
              f"vocab {settings['vocab_size']}), fp32 on CPU ({torch.get_num_threads()} threads); "
              f"{count} tokens = {settings['batches']} batches of {settings['batch_size']}×{settings['seq_len']}; "
              f"best of {args.repeat}\n")
        print(markdown_table(["run", "eval s", "tokens/s", "eval time ratio", "end-to-end s", "end-to-end ratio"], rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
