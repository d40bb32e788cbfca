"""Shared benchmark helpers: synthetic checkpoints, the I/O floor, and timing with peak RSS."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHUNK = 64 * 2**20
BLOCK_ELEMENTS = 2**20  # 4 MiB of fp32 random values, reused for every tensor of a synthetic checkpoint
INPUT_SHARD_BYTES = 2 * 10**9


def llama_config(hidden: int, ffn: int, layers: int, vocab: int, heads: int = 16, kv_heads: int = 8,
                 max_positions: int = 2048) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": max_positions,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}


def make_random_llama(directory: Path, config: dict, shard_bytes: int = 2 * 10**9, seed: int = 0) -> Path:
    """A Llama checkpoint with random fp32 weights, written shard by shard (bounded memory)."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO))
    from surgery import families as arch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    family = arch.FAMILIES["llama"]
    expected = list(arch.expected_tensors(family, config).values())
    generator = torch.Generator().manual_seed(seed)
    groups, size = [[]], 0
    for entry in expected:
        nbytes = 4 * int(torch.Size(entry.shape).numel())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes
    weight_map = {}
    for number, group in enumerate(groups, 1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors"
        tensors = {}
        for entry in group:
            if entry.group == "norm":
                tensors[entry.name] = torch.ones(entry.shape)
            else:
                tensors[entry.name] = torch.randn(entry.shape, generator=generator) * 0.02
            weight_map[entry.name] = name
        save_file(tensors, directory / name, metadata={"format": "pt"})
        del tensors
    if len(groups) > 1:
        total = sum((directory / f).stat().st_size for f in set(weight_map.values()))
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def _table():
    sys.path.insert(0, str(REPO))
    from surgery import families as arch

    return arch


def layout(config: dict, family: str = "llama") -> list:
    """The tensors (name, shape, group) of a `family` checkpoint of `config`, in model order, in the expert layout
    its hub checkpoints store (per expert, or fused where the family stores nothing else)."""
    arch = _table()
    record = arch.FAMILIES[family]
    stored = "per_expert" if "per_expert" in record.stored_layouts else "fused"
    return list(arch.expected_tensors(record, config, stored).values())


def tensor_bytes(entry, element_size: int = 4) -> int:
    count = 1
    for dim in entry.shape:
        count *= dim
    return element_size * count


def sized_config(target_bytes: float, shape: tuple[int, int, int], **extra) -> dict:
    """A config of the given matrix shapes with as many layers as bring the fp32 checkpoint nearest `target_bytes`."""
    hidden, ffn, vocab = shape
    one = sum(tensor_bytes(e) for e in layout(llama_config(hidden, ffn, 1, vocab)))
    two = sum(tensor_bytes(e) for e in layout(llama_config(hidden, ffn, 2, vocab)))
    per_layer, fixed = two - one, one - (two - one)
    layers = max(1, round((target_bytes - fixed) / per_layer))
    return llama_config(hidden, ffn, layers, vocab, **extra)


QUANTIZED_GROUPS = ("attention", "ffn", "experts", "shared_expert")  # what FP8 checkpoints quantize (not routers)


def make_synthetic_llama(directory: Path, config: dict, shard_bytes: int = INPUT_SHARD_BYTES, seed: int = 0,
                         dtype: str = "F32", family: str = "llama", fp8_block: int | None = None) -> Path:
    """A `family` (default Llama) checkpoint of finite pseudo-random weights (F32 or BF16), written fast with memory
    bounded by one block. With `fp8_block` B: as DeepSeek-V3 publishes it, every matrix of the attention, dense MLPs
    and experts in F8_E4M3 with an F32 ``weight_scale_inv`` per B x B block (``quant_method: fp8``); norms, routers,
    embedding and head in `dtype`.

    A single seeded block of BLOCK_ELEMENTS N(0, 0.02) values is generated once; every matrix is that
    block repeated, starting at an offset that changes from tensor to tensor. FP8 values are random bytes with the
    bit that would make 0x7F / 0xFF (E4M3's NaN) cleared. Headers come from
    surgery.safetensors_format.encode_header; data are plain file writes.
    """
    import numpy as np

    sys.path.insert(0, str(REPO))
    from surgery.io.file_io import write_all
    from surgery.io.safetensors_format import encode_header

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    block = (generator.standard_normal(BLOCK_ELEMENTS, dtype=np.float32) * 0.02).astype("<f4")
    one = np.ones(1, dtype="<f4")
    element = 4
    if dtype == "BF16":  # the upper half of each float32 (truncation: fine for synthetic values)
        block, one, element = (block.view("<u4") >> 16).astype("<u2"), (one.view("<u4") >> 16).astype("<u2"), 2
    fp8 = generator.integers(0, 256, BLOCK_ELEMENTS, dtype=np.uint8) & 0xF7
    windows = {dtype: memoryview(np.concatenate([block, block]).tobytes()),  # any block-sized window is contiguous
               "F8_E4M3": memoryview(np.concatenate([fp8, fp8]).tobytes())}
    tensors = []  # (name, dtype, shape, kind): kind "one" (a norm), "scale", or "random"
    for entry in layout(config, family):
        if fp8_block and entry.group in QUANTIZED_GROUPS and len(entry.shape) >= 2:
            grid = (*entry.shape[:-2], -(-entry.shape[-2] // fp8_block), -(-entry.shape[-1] // fp8_block))
            tensors += [(entry.name, "F8_E4M3", entry.shape, "random"),
                        (entry.name + "_scale_inv", "F32", grid, "scale")]
        else:
            tensors.append((entry.name, dtype, entry.shape, "one" if entry.group == "norm" else "random"))
    sizes = {"F32": 4, "BF16": 2, "F8_E4M3": 1}

    def nbytes(tensor) -> int:
        count = 1
        for dim in tensor[2]:
            count *= dim
        return count * sizes[tensor[1]]

    groups, size = [[]], 0
    for tensor in tensors:
        if groups[-1] and size + nbytes(tensor) > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += nbytes(tensor)
    weight_map = {}
    for number, group in enumerate(groups, 1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors"
        header, _ = encode_header([(t[0], t[1], t[2]) for t in group], {"format": "pt"})
        with open(directory / name, "wb") as handle:
            handle.write(header)
            for tensor in group:
                weight_map[tensor[0]] = name
                remaining = nbytes(tensor)
                if tensor[3] == "one":
                    write_all(handle, np.repeat(one, remaining // element).tobytes())
                    continue
                if tensor[3] == "scale":  # 0.02 spread over E4M3's range
                    write_all(handle, np.full(remaining // 4, 0.02 / 448, dtype="<f4").tobytes())
                    continue
                doubled = windows[tensor[1]]
                block_bytes = len(doubled) // 2
                offset = (len(weight_map) * 7919 * 4) % block_bytes
                while remaining:
                    count = min(remaining, block_bytes)
                    write_all(handle, doubled[offset:offset + count])  # 128 KiB writes (surgery.io.write_all)
                    remaining -= count
    if len(groups) > 1:
        total = sum(nbytes(t) for t in tensors)
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {**config, "torch_dtype": {"F32": "float32", "BF16": "bfloat16"}[dtype]}
    if fp8_block:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [fp8_block, fp8_block]}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def save_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A whitespace word-level tokenizer with `vocab_size` entries (the random models need one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(directory))


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())


def warm(directory: Path) -> None:
    """Read every file once so that all runs start with a warm page cache."""
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(CHUNK):
                    pass


def io_floor(inputs: list[Path], output_bytes: int, scratch: Path) -> float:
    """Seconds to read every input file once and write `output_bytes` with plain file I/O."""
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / "floor.bin"
    started = time.perf_counter()
    written = 0
    with open(target, "wb") as out:
        for path in inputs:
            with open(path, "rb") as handle:
                while block := handle.read(CHUNK):
                    if written < output_bytes:
                        out.write(block[: output_bytes - written])
                        written += min(len(block), output_bytes - written)
        filler = b"\0" * CHUNK
        while written < output_bytes:
            count = min(CHUNK, output_bytes - written)
            out.write(filler[:count])
            written += count
    elapsed = time.perf_counter() - started
    shutil.rmtree(scratch, ignore_errors=True)
    return elapsed


def timed(command: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stderr) of a command, measured by /usr/bin/time -v."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    return wall, int(match.group(1)) / 1024 if match else float("nan"), result.stderr


def baseline_rss(imports: str = "import torch, safetensors, surgery.writer") -> float:
    """Peak RSS (MiB) of a Python process that only imports what the tool imports."""
    return timed([sys.executable, "-c", imports])[1]


def drop_caches() -> bool:
    """sync, then drop the page cache where permitted (root), so the next run reads its input from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def surgery_command(*args) -> list[str]:
    return [sys.executable, "-m", "surgery", "-q", *map(str, args)]


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
