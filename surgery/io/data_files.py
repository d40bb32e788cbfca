"""Data files users give for calibration and evaluation: UTF-8 text and token ids.

Both are checked as they are read: an empty, binary or non-UTF-8 text file and a token file that holds
anything but non-empty lists of non-negative integers are refused with the file and the reason.
``SAMPLE_TEXT`` is the held-out text shipped with surgery, the default calibration and validation sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from surgery.errors import SurgeryError

SAMPLE_TEXT = Path(__file__).resolve().parents[1] / "data" / "sample.txt"
TOKEN_FILE_SUFFIXES = (".npy", ".pt", ".jsonl")


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
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise SurgeryError(f"{path}: not a numeric .npy array ({exc})") from None
        rows = array.tolist() if array.ndim == 2 else [array.tolist()]
    elif path.suffix == ".pt":
        import torch  # lazy: only a .pt token file needs torch

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
