"""Sample batches for validation and calibration: text or pre-tokenised ids, padded and masked.

Batches are produced lazily, so a long data file never sits in memory as logits; padding is
marked in the attention mask and every statistic downstream ignores it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SurgeryError

SAMPLE_TEXT = Path(__file__).parent / "data" / "sample.txt"


@dataclass
class Batch:
    input_ids: object  # LongTensor [B, T]
    attention_mask: object  # LongTensor [B, T], 0 on padding

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def read_text(path) -> str:
    """A calibration or evaluation text file; refuses empty and binary files with the reason."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SurgeryError(f"{path}: cannot read: {exc.strerror}") from None
    if not raw.strip():
        raise SurgeryError(f"{path}: text file is empty")
    if b"\x00" in raw[:65536]:
        raise SurgeryError(f"{path}: not a text file (contains NUL bytes)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SurgeryError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def read_token_ids(path) -> list[list[int]]:
    """Pre-tokenised ids: .npy / .pt (1-D or 2-D integer arrays) or .jsonl (one list of ids per line)."""
    path = Path(path)
    if path.suffix == ".npy":
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise SurgeryError(f"{path}: not a numeric .npy array ({exc})") from None
        rows = array.tolist() if array.ndim == 2 else [array.tolist()]
    elif path.suffix == ".pt":
        import torch

        try:
            value = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:  # torch raises many types for bad files
            raise SurgeryError(f"{path}: not a tensor file loadable with weights_only=True ({type(exc).__name__})") from None
        if not isinstance(value, torch.Tensor):
            raise SurgeryError(f"{path}: expected a tensor of token ids, found {type(value).__name__}")
        rows = value.tolist() if value.dim() == 2 else [value.tolist()]
    elif path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    raise SurgeryError(f"{path}:{number}: not JSON") from None
                item = item.get("input_ids") if isinstance(item, dict) else item
                rows.append(item)
    else:
        raise SurgeryError(f"{path}: token file must be .npy, .pt or .jsonl")
    if not rows or not all(isinstance(r, list) and r and all(type(t) is int and t >= 0 for t in r) for r in rows):
        raise SurgeryError(f"{path}: expected non-empty lists of non-negative integer token ids")
    return rows


def tokenize(tokenizer, text: str) -> list[int]:
    """The text tokenised in one piece; the tokenizer's "longer than the maximum length" warning is
    silenced (callers cut the ids into rows of at most the model's length)."""
    if tokenizer is None:
        raise SurgeryError("the model directory has no tokenizer; pass pre-tokenised ids with --tokens")
    from surgery.loading import quiet_transformers

    with quiet_transformers(always=True):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chunk_rows(ids: list[int], seq_len: int, bos_token_id: int | None = None) -> list[list[int]]:
    """Cut one long token stream into rows of at most seq_len (bos prepended when known)."""
    body = seq_len - (1 if bos_token_id is not None else 0)
    rows = [ids[start:start + body] for start in range(0, len(ids), body)]
    return [([bos_token_id] if bos_token_id is not None else []) + row for row in rows if len(row) > 1 or not rows[1:]]


def batches(rows: list[list[int]], batch_size: int, seq_len: int, pad_token_id: int = 0,
            max_tokens: int | None = None, vocab_size: int | None = None):
    """Yield right-padded Batch objects; stops after max_tokens real tokens."""
    import torch

    if vocab_size is not None:
        for row in rows:
            bad = [t for t in row if t >= vocab_size]
            if bad:
                raise SurgeryError(f"token id {bad[0]} is out of range for a vocabulary of {vocab_size}")
    budget = max_tokens
    pending: list[list[int]] = []
    for row in rows:
        row = row[:seq_len]
        if budget is not None:
            if budget <= 0:
                break
            row = row[:budget]
            budget -= len(row)
        pending.append(row)
        if len(pending) == batch_size:
            yield _pad(pending, pad_token_id, torch)
            pending = []
    if pending:
        yield _pad(pending, pad_token_id, torch)


def _pad(rows, pad_token_id, torch) -> Batch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return Batch(ids, mask)


def text_batches(tokenizer, text: str, batch_size: int = 8, seq_len: int = 256, max_tokens: int | None = None,
                 vocab_size: int | None = None):
    """Batches of a text tokenised with the model's own tokenizer."""
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    rows = chunk_rows(tokenize(tokenizer, text), seq_len, bos)
    return batches(rows, batch_size, seq_len, pad if pad is not None else 0, max_tokens, vocab_size)
