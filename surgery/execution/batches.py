"""Token rows in batches: what a model runs on for calibration and validation.

Text is tokenised with the model's own tokenizer in one piece and cut into rows (BOS first when the
tokenizer has one); rows are right-padded into ``Batch`` objects whose attention mask marks the padding,
which every statistic downstream ignores. Batches are produced lazily, so a long data file never sits in
memory as logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgery.errors import SurgeryError
from surgery.execution.loading import quiet_transformers


@dataclass
class Batch:
    input_ids: object  # LongTensor [B, T]
    attention_mask: object  # LongTensor [B, T], 0 on padding

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def tokenize(tokenizer, text: str) -> list[int]:
    """The text tokenised in one piece; the tokenizer's "longer than the maximum length" warning is
    silenced (callers cut the ids into rows of at most the model's length)."""
    if tokenizer is None:
        raise SurgeryError("the model directory has no tokenizer; pass pre-tokenised ids with --tokens")
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
            yield _pad(pending, pad_token_id)
            pending = []
    if pending:
        yield _pad(pending, pad_token_id)


def _pad(rows, pad_token_id) -> Batch:
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
