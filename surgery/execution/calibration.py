"""The one calibration set: token rows from a text or a token-id file, cut, batched and checked.

Every data-driven step (calibrated routers of upcycle, split and merge; the neuron statistics of
the data-driven splits) runs the model on a ``CalibrationSet``: text is tokenised with the
model's own tokenizer and cut into rows of ``SEQ_LEN`` tokens (BOS first when the tokenizer has
one); token-id files (.npy, .pt, .jsonl) are cut the same way; rows are right-padded into batches
of ``BATCH_SIZE`` with padding masked out of every statistic. Bad data is refused here, before any
weight is read: an empty or binary file, ids beyond the vocabulary, rows that hold only padding.
A merge combines one set per domain; each batch remembers its domain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.execution.batches import batches, chunk_rows, tokenize
from surgery.execution.loading import load_tokenizer
from surgery.io.data_files import SAMPLE_TEXT, TOKEN_FILE_SUFFIXES, read_text, read_token_ids

SEQ_LEN = 256
BATCH_SIZE = 8


@dataclass
class CalibrationSet:
    batches: list  # execution.batches.Batch
    source: str  # what the tokens are, for messages
    domains: list[int] = field(default_factory=list)  # per batch: the domain (merge: expert index); [] = one domain

    @property
    def tokens(self) -> int:
        return sum(batch.tokens for batch in self.batches)

    @property
    def sequences(self) -> int:
        return sum(int(batch.input_ids.shape[0]) for batch in self.batches)

    def domain_of(self, batch: int) -> int:
        return self.domains[batch] if self.domains else 0

    # ---------------------------------------------------------------- building
    @classmethod
    def load(cls, path, model_dir, config: dict, max_tokens: int, option: str = "--calibration") -> "CalibrationSet":
        """`path` (text or token ids; None: the shipped sample text) tokenised for the model in `model_dir`."""
        if path is not None and Path(path).suffix in TOKEN_FILE_SUFFIXES:
            return cls.from_token_rows(read_token_ids(path), str(path), config, max_tokens)
        text_path = Path(path) if path is not None else SAMPLE_TEXT
        if path is None and not text_path.exists():
            raise SurgeryError(f"no shipped sample text at {text_path}; pass {option} FILE")
        text = read_text(text_path)
        tokenizer = _tokenizer(model_dir, text_path, option)
        source = str(text_path) if path is not None else f"the shipped sample text ({text_path.name})"
        return cls.from_text(text, tokenizer, config, max_tokens, source)

    @classmethod
    def from_token_rows(cls, rows: list[list[int]], source: str, config: dict, max_tokens: int) -> "CalibrationSet":
        """Rows of token ids (a token file's), each cut to the model's sequence length."""
        seq_len = sequence_length(config)
        pieces = [piece for row in rows for piece in chunk_rows(row, seq_len)]
        return cls.from_rows(pieces, source, config, max_tokens, pad_token_id=_config_pad(config))

    @classmethod
    def from_text(cls, text: str, tokenizer, config: dict, max_tokens: int, source: str) -> "CalibrationSet":
        ids = tokenize(tokenizer, text)
        rows = chunk_rows(ids, sequence_length(config), getattr(tokenizer, "bos_token_id", None)) if ids else []
        pad = getattr(tokenizer, "pad_token_id", None)
        return cls.from_rows(rows, source, config, max_tokens, pad_token_id=pad if pad is not None else _config_pad(config))

    @classmethod
    def from_rows(cls, rows: list[list[int]], source: str, config: dict, max_tokens: int,
                  pad_token_id: int = 0) -> "CalibrationSet":
        if max_tokens < 2:
            raise SurgeryError(f"--calibration-tokens {max_tokens}: expected at least 2")
        vocab = config.get("vocab_size")
        for row in rows:
            bad = [token for token in row if vocab is not None and token >= vocab]
            if bad:
                raise SurgeryError(f"{source}: token id {bad[0]} is out of range for a vocabulary of {vocab}")
        made = list(batches(rows, BATCH_SIZE, sequence_length(config), pad_token_id, max_tokens))
        tokens = sum(batch.tokens for batch in made)
        if tokens < 2:
            raise SurgeryError(f"{source}: calibration data gives {tokens} token(s); at least 2 are needed")
        real = [int(t) for batch in made for t in batch.input_ids[batch.attention_mask.bool()].tolist()]
        if pad_token_id is not None and all(token == pad_token_id for token in real):
            raise SurgeryError(f"{source}: calibration data holds only the padding token (id {pad_token_id})")
        return cls(made, source)

    @classmethod
    def combine(cls, parts: list[tuple[int, "CalibrationSet"]]) -> "CalibrationSet":
        """One set of several domains (merge: expert index -> that expert's text); batches keep their domain."""
        joined, domains = [], []
        for domain, part in parts:
            joined += part.batches
            domains += [domain] * len(part.batches)
        return cls(joined, ", ".join(part.source for _, part in parts), domains)


def sequence_length(config: dict) -> int:
    return min(SEQ_LEN, int(config.get("max_position_embeddings") or SEQ_LEN))


def _config_pad(config: dict) -> int:
    pad = config.get("pad_token_id")
    return pad if isinstance(pad, int) and pad >= 0 else 0


def _tokenizer(model_dir, text_path: Path, option: str):
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise SurgeryError(f"{model_dir}: no tokenizer files, so {text_path} cannot be tokenised; pass token ids "
                           f"with {option} FILE ({', '.join(TOKEN_FILE_SUFFIXES)})")
    return tokenizer
