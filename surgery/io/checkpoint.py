"""Opening a checkpoint: a directory (single file or shards + index) or one .safetensors file.

A ``Checkpoint`` knows every tensor's file, offset, dtype and shape from the headers alone, and
reads tensor data lazily, one tensor (or a subset of its rows) at a time, with positioned reads
(``os.preadv``) into a buffer owned by the returned tensor. Positioned reads rather than mmap keep
the process's resident memory at about one tensor: pages of a mapped file count towards RSS for
as long as the mapping lives, which for a whole shard is the shard's size.

A directory that holds ``config.json`` and no weights is refused, except inside ``config_only(headers)``: there it
opens as a config-only checkpoint whose tensor headers ``headers(directory, config)`` derives (the family table's
shapes; this layer does not know the families), with no data behind them: ``surgery inspect`` and a ``--dry-run``
size a model before anyone downloads it, and reading any tensor's data is refused.

A multimodal checkpoint that nests a text model a family reads (``surgery.families.nesting``: Llama-4-Scout's
Llama4ForConditionalGeneration ...) opens as that text model: ``config`` is the nested text config, ``tensors``
are named as the text model names them, and the other towers' tensors are ``carried`` (readable by their stored
names, never part of the model); ``nesting`` and ``stored_config`` let a writer nest an output again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace
from pathlib import Path

from surgery import families as arch
from surgery.errors import SurgeryError
from surgery.io import quantized
from surgery.io.dtypes import torch_dtype
from surgery.io.file_io import pread_exact, pread_into
from surgery.io.safetensors_format import TensorInfo
from surgery.io.shard_files import INDEX_NAME, open_indexed, open_single, open_unindexed, read_config

SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files that are weights or derived from them; never copied as side files.
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES + (".gguf", ".h5", ".msgpack", ".onnx")
SIDE_FILE_MAX_BYTES = 64 * 2**20
CONFIG_ONLY_USES = "`surgery inspect` and the --dry-run of copy, upcycle and prune work from config.json alone"

# (headers, needs): (directory, config) -> {stored name: TensorInfo} of a config-only directory, or None where such a
# directory is refused, and what the refusal says needs the weights
_CONFIG_HEADERS: ContextVar[tuple[Callable | None, str]] = ContextVar("config_headers", default=(None, "this command"))


@contextmanager
def config_only(headers: Callable | None, needs: str = "this command"):
    """Within: a directory holding config.json and no weights opens with the tensor headers `headers(directory,
    config)` derives; with `headers` None it is refused, saying `needs` (what needs the weights) as outside."""
    token = _CONFIG_HEADERS.set((headers, needs))
    try:
        yield
    finally:
        _CONFIG_HEADERS.reset(token)


def config_only_refusal(directory: Path, needs: str) -> SurgeryError:
    """The one-line refusal of a command that needs weights on a directory that holds only config.json."""
    return SurgeryError(f"{directory}: holds only config.json, no weights: {needs} needs the model's safetensors "
                        f"files ({SINGLE_NAME}, or the shards of {INDEX_NAME}); {CONFIG_ONLY_USES}")


def refuse_pickle(path: Path) -> None:
    raise SurgeryError(
        f"{path}: pickle checkpoints are refused (unpickling runs code from the file); convert it to "
        "safetensors first, e.g. load it in a trusted environment and call "
        "model.save_pretrained(dir, safe_serialization=True)")


class Checkpoint:
    """A safetensors checkpoint opened for lazy reading."""

    def __init__(self, path: Path, directory: Path, shards: list[Path], tensors: dict[str, TensorInfo],
                 config: dict | None, index: dict | None, metadata: dict[Path, dict[str, str]],
                 config_only: bool = False):
        self.path = path
        self.directory = directory
        self.shards = shards
        self.tensors = tensors
        self.config = config
        self.index = index
        self.metadata = metadata
        self.label: str | None = None  # short name shown in plans (merge: the expert's name)
        self.config_only = config_only  # headers derived from config.json; no data to read
        self._fds: dict[Path, int] = {}
        self.nesting = None  # the multimodal wrapper this text model was read from (see the module docstring)
        self.stored_config = config  # config.json as stored (the wrapper's, where nested)
        self.carried: dict[str, TensorInfo] = {}  # the wrapper's other towers' tensors, by stored name
        self.quantization = None  # the scheme of a quantized checkpoint (surgery.io.quantized); its weights are logical
        self.stored: Checkpoint = self  # the tensors as stored: of a quantized checkpoint, every part by its own name

    def _dequantized(self) -> "Checkpoint":
        """Open a quantized checkpoint as the model it encodes: each quantized weight one logical tensor."""
        if self.nesting is not None and (self.stored_config or {}).get("quantization_config") is not None:
            raise SurgeryError(f"{self.directory / 'config.json'}: a quantized {self.nesting.architecture} is not read "
                               f"yet (its quantization_config covers the wrapper's towers); widen it first with "
                               f"transformers, or use its unquantized release")
        self.quantization = quantized.scheme_of(self.config, self.directory / "config.json")
        if self.quantization is not None:
            self.stored = StoredParts(self, self.tensors)
            self.tensors = quantized.view(self.quantization, self.config, self.tensors, self.directory,
                                          lambda info: self.stored.read(info.name))
        return self

    def _nest(self) -> "Checkpoint":
        """Open the text model a multimodal checkpoint nests (a family's ``NESTING``), if it is one."""
        nesting, view = arch.text_view(self.config, self.directory / "config.json") if self.config else (None, None)
        if nesting is None:
            return self
        self.nesting, self.config = nesting, view
        tensors = {}
        for stored, info in self.tensors.items():
            if nesting.is_carried(stored):
                self.carried[stored] = info
            else:
                name = nesting.view_name(stored)
                tensors[name] = replace(info, name=name)
        self.tensors = tensors
        return self

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path, require_config: bool = False) -> "Checkpoint":
        path = Path(path)
        if not path.exists():
            raise SurgeryError(f"{path}: no such file or directory")
        if path.is_file():
            if path.suffix in PICKLE_SUFFIXES:
                refuse_pickle(path)
            if path.suffix != ".safetensors" and path.name != INDEX_NAME:
                raise SurgeryError(f"{path}: not a checkpoint: expected a directory, a .safetensors file or {INDEX_NAME}")
            directory = path.parent
        else:
            directory = path
        config = read_config(directory / "config.json", require_config)
        if path.is_file() and path.suffix == ".safetensors":
            shards, tensors, index, metadata = open_single(path)
        elif (directory / INDEX_NAME).exists():
            shards, tensors, index, metadata = open_indexed(directory / INDEX_NAME)
        elif (directory / SINGLE_NAME).exists():
            shards, tensors, index, metadata = open_single(directory / SINGLE_NAME)
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
                if pickles:
                    refuse_pickle(pickles[0])
                if config is not None:
                    return cls._from_config(path, directory, config)
                raise SurgeryError(f"{directory}: no {SINGLE_NAME}, {INDEX_NAME} or other .safetensors file found")
            shards, tensors, index, metadata = open_unindexed(files)
        return cls(path, directory, shards, tensors, config, index, metadata)._nest()._dequantized()

    @classmethod
    def _from_config(cls, path: Path, directory: Path, config: dict) -> "Checkpoint":
        headers, needs = _CONFIG_HEADERS.get()
        if headers is None:
            raise config_only_refusal(directory, needs)
        return cls(path, directory, [], headers(directory, config), config, None, {},
                   config_only=True)._nest()._dequantized()

    def add_view(self, name: str, stored: str, rows: tuple[int, int]) -> None:
        """Expose rows a:b of stored tensor `stored` (a contiguous block along its first dimension, e.g. the q
        rows of a fused qkv_proj) as tensor `name`: readers, row reads and byte copies then treat it as
        any stored tensor."""
        info = self.info(stored)
        start, stop = rows
        if info.parts:
            raise SurgeryError(f"{info.file}: tensor {stored!r} is a {info.scheme} weight; taking rows {start}:{stop} of "
                               f"it as {name!r} is not supported (dequantize first: surgery copy SRC OUT --dtype bf16)")
        if len(info.shape) < 1 or not 0 <= start <= stop <= info.shape[0]:
            raise SurgeryError(f"{info.file}: tensor {stored!r} has shape {list(info.shape)}; cannot take rows "
                               f"{start}:{stop} as {name!r}")
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        self.tensors[name] = TensorInfo(name, info.dtype, (stop - start,) + tuple(info.shape[1:]), info.file,
                                        info.offset + start * row_bytes, (stop - start) * row_bytes)

    # ---------------------------------------------------------------- reading
    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name] if name in self.tensors else self.carried[name]
        except KeyError:
            raise SurgeryError(f"{self.directory}: tensor {name!r} not found in the checkpoint") from None

    def descriptor(self, file: Path) -> int:
        """An open read-only descriptor of `file` (one of this checkpoint's shards), kept until ``close``."""
        if self.config_only:
            raise config_only_refusal(self.directory, "reading tensor data")
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError as exc:
                raise SurgeryError(f"{file}: cannot open: {exc.strerror}") from None
            self._fds[file] = fd
        return fd

    def read_bytes(self, name: str) -> bytearray:
        info = self._stored(name)
        return pread_exact(self.descriptor(info.file), info.nbytes, info.offset, info.file, name)

    def _stored(self, name: str) -> TensorInfo:
        """The header of a tensor stored as one range of bytes (a logical quantized tensor is not)."""
        info = self.info(name)
        if info.parts:
            raise AssertionError(f"{name} is a {info.scheme} weight stored as {len(info.parts)} tensors; read its parts")
        return info

    def read_part(self, part: TensorInfo):
        """One stored tensor of a quantized weight (a ``TensorInfo`` of its ``parts``), in its stored dtype."""
        import torch  # lazy: headers, byte copies and numpy reads need no torch

        data = pread_exact(self.descriptor(part.file), part.nbytes, part.offset, part.file, part.name)
        if not part.nbytes:
            return torch.empty(part.shape, dtype=torch_dtype(part.dtype))
        return torch.frombuffer(data, dtype=torch_dtype(part.dtype)).reshape(part.shape)

    def read(self, name: str):
        """The whole tensor, in its stored dtype, owning its memory; a quantized weight dequantized, in float32."""
        import torch  # lazy: headers, byte copies and numpy reads need no torch

        info = self.info(name)
        if info.parts:
            return self.quantization.dequantize_parts(info, {role: self.read_part(part) for role, part in info.parts})
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        return torch.frombuffer(self.read_bytes(name), dtype=torch_dtype(info.dtype)).reshape(info.shape)

    def read_rows(self, name: str, rows, part: TensorInfo | None = None):
        """Rows `rows` (first-dimension indices, any order) of a tensor (or of `part`, one stored tensor of a
        quantized weight), reading only those rows."""
        import torch  # lazy: headers, byte copies and numpy reads need no torch

        info = part or self.info(name)
        rows = [int(r) for r in rows]
        if info.parts:  # stacked [E, ...] weights: the same rows of every part; a matrix: read whole
            if len(info.shape) < 3:
                return self.read(name)[torch.as_tensor(rows, dtype=torch.long)]
            return self.quantization.dequantize_parts(info, {role: self.read_rows(part.name, rows, part) for role, part in info.parts})
        if not info.shape:
            raise SurgeryError(f"{info.file}: tensor {name!r} is a scalar; cannot select rows")
        for row in rows:
            if not 0 <= row < info.shape[0]:
                raise SurgeryError(f"{info.file}: tensor {name!r}: row {row} out of range for shape {list(info.shape)}")
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        out = bytearray(row_bytes * len(rows))
        fd = self.descriptor(info.file)
        start = 0
        while start < len(rows):  # one read per run of consecutive rows
            end = start + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            chunk = pread_exact(fd, row_bytes * (end - start), info.offset + rows[start] * row_bytes, info.file, name)
            out[start * row_bytes:end * row_bytes] = chunk
            start = end
        shape = (len(rows),) + tuple(info.shape[1:])
        if not out:
            return torch.empty(shape, dtype=torch_dtype(info.dtype))
        return torch.frombuffer(out, dtype=torch_dtype(info.dtype)).reshape(shape)

    def read_rows_into(self, name: str, start: int, stop: int, out) -> None:
        """Rows start:stop of a stored tensor, read with positioned reads straight into numpy array `out`."""
        info = self._stored(name)
        rows = info.shape[0] if info.shape else 1
        if not 0 <= start <= stop <= rows or out.nbytes * rows != info.nbytes * (stop - start):
            raise SurgeryError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, cannot read rows "
                               f"{start}:{stop}")
        row_bytes = info.nbytes // rows if rows else 0
        if out.nbytes:
            pread_into(self.descriptor(info.file), memoryview(out).cast("B"), info.offset + row_bytes * start,
                       info.file, name)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---------------------------------------------------------------- facts
    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def side_files(self) -> list[Path]:
        """Small non-weight files to carry into an output: tokenizer, generation config, templates."""
        found = []
        for entry in sorted(self.directory.iterdir()):
            if not entry.is_file() or entry.name in ("config.json", INDEX_NAME) or entry.name.startswith("."):
                continue
            if entry.suffix in WEIGHT_SUFFIXES or entry.name.endswith(".index.json"):
                continue
            if entry.name.lower() in ("readme.md", "surgery-manifest.json"):
                continue  # the source's model card describes the source, not our output
            if entry.stat().st_size > SIDE_FILE_MAX_BYTES:
                continue
            found.append(entry)
        return found


class StoredParts(Checkpoint):
    """A quantized checkpoint's tensors as stored, each part of a quantized weight under its own name: what a plan
    copies byte for byte when it keeps a weight quantized. It reads through its owner's open descriptors."""

    def __init__(self, owner: Checkpoint, tensors: dict[str, TensorInfo]):
        self.owner = owner
        self.path, self.directory, self.shards, self.tensors = owner.path, owner.directory, owner.shards, tensors
        self.config, self.index, self.metadata, self.config_only = owner.config, owner.index, owner.metadata, False
        self.nesting, self.stored_config, self.carried, self.quantization = None, owner.stored_config, {}, None
        self.stored = self

    @property
    def label(self):
        return self.owner.label

    def descriptor(self, file: Path) -> int:
        return self.owner.descriptor(file)

    def close(self) -> None:
        """The owner's descriptors: the owner closes them."""
