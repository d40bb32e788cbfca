"""Hidden states of the whole token set between two layers, in memory or spilled to a file.

Each batch's hidden states are kept on the CPU in float32, or in the 16-bit type a layer computed them
in (bfloat16 or float16: the same values in half the memory; every use converts them back). When
the memory budget (``surgery.execution.settings.MemoryBudget``) cannot hold them next to one layer's weights, they go to a temporary file beside the
output instead, written and read with positioned I/O (not a mapping, whose resident pages would
count towards the process's memory); the file is removed when the run ends, whatever happens.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from surgery.io.file_io import WRITE_CHUNK, pread_exact


class HiddenStore:
    """Per-batch hidden states (float32, or the 16-bit float type they were computed in), in memory or in a
    spill file."""

    def __init__(self, spill_dir: Path | None = None, label: str = "hidden"):
        self._memory: dict[int, object] = {}
        self._blocks: dict[int, tuple[int, tuple, object, int]] = {}  # batch -> (offset, shape, dtype, nbytes)
        self._fd = None
        self._path = None
        self._end = 0
        if spill_dir is not None:
            spill_dir = Path(spill_dir)
            handle, path = tempfile.mkstemp(prefix=f".surgery-{label}-", suffix=".hidden", dir=spill_dir)
            self._fd, self._path = handle, Path(path)

    @property
    def spilled(self) -> bool:
        return self._fd is not None

    @property
    def nbytes(self) -> int:
        """Bytes held, in memory or in the spill file."""
        return sum(int(value.nbytes) for value in self._memory.values()) + sum(
            block[-1] for block in self._blocks.values())

    def put(self, batch: int, value) -> None:
        """Keep batch `batch`: a tensor, or a list of its row pieces in order (spilled, written one after the
        other, never joined in memory)."""
        pieces = [piece.detach().to("cpu", _kept(piece.dtype)).contiguous()
                  for piece in (value if isinstance(value, list) else [value])]
        if self._fd is None:
            self._memory[batch] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            return
        shape = (sum(int(piece.shape[0]) for piece in pieces), *pieces[0].shape[1:])
        nbytes = sum(piece.nbytes for piece in pieces)
        self._blocks[batch] = (self._end, shape, pieces[0].dtype, nbytes)
        while pieces:
            piece = pieces.pop(0)
            self._write_at(self._end, piece)
            self._end += piece.nbytes

    def zeros(self, batch: int, shape: tuple, dtype) -> None:
        """Batch `batch` as zeros of `shape` (kept as ``put`` keeps `dtype`), to be filled rows at a time
        (``write``); spilled, it is a hole in the file, which reads as zeros and takes no memory."""
        kept = _kept(dtype)
        if self._fd is None:
            self._memory[batch] = torch.zeros(shape, dtype=kept)
            return
        nbytes = math.prod(shape) * kept.itemsize
        self._blocks[batch] = (self._end, tuple(shape), kept, nbytes)
        self._end += nbytes
        os.ftruncate(self._fd, self._end)

    def get(self, batch: int, device: str = "cpu", dtype=None, rows: slice | None = None):
        """Batch `batch` (only `rows` of it when given: spilled, only those are read) on `device` in `dtype`
        (default float32). Held in memory in that type and place, it is the stored tensor itself."""
        if self._fd is None:
            value = self._memory[batch] if rows is None else self._memory[batch][rows]
        else:
            offset, size, shape, kept = self._span(batch, rows)
            raw = pread_exact(self._fd, size, offset, self._path, f"hidden states of batch {batch}")
            value = torch.frombuffer(raw, dtype=kept).reshape(shape)
        return value.to(device=device, dtype=dtype or torch.float32)

    def rows(self, batch: int, device: str = "cpu", dtype=None, last: bool = False):
        """Batch `batch` for a layer call, which reads it a row slice at a time: held in memory, the tensor
        (``get``; dropped from the store when `last`, see ``take``); spilled, a view whose slices are read
        from the file as they are taken, so the whole batch is never in memory."""
        if self._fd is None:
            return (self.take if last else self.get)(batch, device, dtype)
        return _SpilledRows(self, batch, device, dtype)

    def write(self, batch: int, rows: slice, value) -> None:
        """Set rows `rows` of batch `batch` (stored by ``put`` or ``zeros``) to `value`."""
        if self._fd is None:
            target = self._memory[batch][rows]
            if value.data_ptr() != target.data_ptr():  # not the stored rows themselves, as ``get`` gives them
                target.copy_(value)
            return
        offset, size, shape, kept = self._span(batch, rows)
        value = value.detach().to("cpu", kept).contiguous()
        if tuple(value.shape) != shape:
            raise AssertionError(f"batch {batch}: rows {rows} are {shape}, given {tuple(value.shape)}")
        self._write_at(offset, value)

    def _span(self, batch: int, rows: slice | None) -> tuple:
        """(offset, bytes, shape, dtype) of rows `rows` (None: all) of spilled batch `batch` in the file."""
        offset, shape, kept, nbytes = self._blocks[batch]
        start, stop, _ = (rows or slice(None)).indices(shape[0])
        row_bytes = nbytes // shape[0]
        return offset + start * row_bytes, (stop - start) * row_bytes, (stop - start, *shape[1:]), kept

    def _write_at(self, offset: int, value) -> None:
        data = value.view(torch.uint8).reshape(-1).numpy()
        written = 0
        while written < data.nbytes:  # WRITE_CHUNK at a time (surgery.io.write_all says why)
            written += os.pwrite(self._fd, data[written:written + WRITE_CHUNK], offset + written)

    def take(self, batch: int, device: str = "cpu", dtype=None):
        """``get`` for the last read of a batch: held in memory, it is dropped from the store (a spilled one
        stays in the file, removed with it)."""
        value = self.get(batch, device, dtype)
        self._memory.pop(batch, None)
        return value

    def close(self) -> None:
        self._memory.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._path.unlink(missing_ok=True)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class _SpilledRows:
    """A spilled batch as a layer call uses it: its shape, and row slices read when taken."""

    def __init__(self, store: HiddenStore, batch: int, device: str, dtype):
        self._store, self._batch, self._device, self._dtype = store, batch, device, dtype
        self.shape = store._blocks[batch][1]

    def __getitem__(self, rows: slice):
        return self._store.get(self._batch, self._device, self._dtype, rows)


def _kept(dtype):
    """The type hidden states are kept in: float32, or the 16-bit float type they were computed in."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
