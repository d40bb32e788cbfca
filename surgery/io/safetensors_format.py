"""The safetensors file format: header parsing and validation, header serialisation.

We parse headers ourselves (rather than only through ``safe_open``) because every byte of a
header may come from a stranger's file: lengths, offsets, dtypes and shapes are checked before
anything is allocated, and every failure names the file and tensor. The format itself is the one
``safetensors`` defines (8-byte little-endian header length, JSON header, raw little-endian data),
and files we write are re-opened with ``safetensors.safe_open`` as a check.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.io.dtypes import DTYPE_SIZES

# A real header holds ~100 bytes per tensor; 100 MB covers millions of tensors. Larger is refused
# before any allocation.
MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, size, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute offset of the first byte in `file`
    nbytes: int
    # a quantized weight (``surgery.io.quantized``): the logical tensor, `dtype` the model's and `shape` the weight's,
    # made of the stored tensors `parts` ((role, TensorInfo) ...) of scheme `scheme`; `nbytes` is theirs on disk
    scheme: str | None = None
    parts: tuple = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    file: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int


def read_header(path: Path) -> Header:
    """Read and validate the header of one safetensors file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if size == 0:
                raise SurgeryError(f"{path}: file is empty (expected a safetensors file)")
            if len(prefix) < 8:
                raise SurgeryError(f"{path}: file is truncated: {size} bytes, expected at least 8 for the header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise SurgeryError(f"{path}: header length {length} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes")
            if 8 + length > size:
                raise SurgeryError(f"{path}: header length {length} bytes is larger than the file ({size} bytes): file truncated or not safetensors")
            raw = handle.read(length)
    except OSError as exc:
        raise SurgeryError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SurgeryError(f"{path}: header is not valid JSON ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise SurgeryError(f"{path}: header must be a JSON object, found {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SurgeryError(f"{path}: header __metadata__ must map strings to strings")
    data_start = 8 + length
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, data_size)
    _check_no_overlap(path, tensors.values(), data_start)
    return Header(file=path, metadata=metadata, tensors=tensors, data_start=data_start)


def _tensor_info(path: Path, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise SurgeryError(f"{where}: header entry must be an object, found {type(entry).__name__}")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise SurgeryError(f"{where}: unknown dtype {dtype!r} (expected one of {', '.join(DTYPE_SIZES)})")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise SurgeryError(f"{where}: shape must be a list of non-negative integers, found {shape!r}")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise SurgeryError(f"{where}: data_offsets must be [begin, end] integers, found {offsets!r}")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise SurgeryError(f"{where}: data_offsets {offsets} are negative or reversed")
    if end > data_size:
        raise SurgeryError(f"{where}: data_offsets end {end} is beyond the data section ({data_size} bytes): file truncated or header corrupt")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise SurgeryError(f"{where}: byte range is {end - begin} bytes but shape {shape} x {dtype} needs {expected}")
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), file=path, offset=data_start + begin, nbytes=expected)


def _check_no_overlap(path: Path, tensors, data_start: int) -> None:
    previous = None
    for info in sorted(tensors, key=lambda t: (t.offset, t.nbytes)):
        if info.nbytes == 0:
            continue
        if previous is not None and info.offset < previous.offset + previous.nbytes:
            raise SurgeryError(
                f"{path}: tensors {previous.name!r} and {info.name!r} overlap "
                f"(bytes {previous.offset - data_start}-{previous.offset - data_start + previous.nbytes} and "
                f"{info.offset - data_start}-{info.offset - data_start + info.nbytes})")
        previous = info


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """Serialise a header for tensors written back to back in the given order.

    Returns the bytes to write at the start of the file (length prefix + JSON padded with spaces
    to a multiple of 8, as safetensors does) and each tensor's offset within the data section.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offsets = []
    position = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
        offsets.append(position)
        position += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
