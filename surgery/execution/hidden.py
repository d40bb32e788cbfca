"""Hidden states of the whole token set between two layers, and the memory budget that places them.

Each batch's hidden states are kept on the CPU in float32, or in the 16-bit type a layer computed them
in (bfloat16 or float16: the same values in half the memory; every use converts them back). When
the budget cannot hold them next to one layer's weights, they go to a temporary file beside the
output instead, written and read with positioned I/O (not a mapping, whose resident pages would
count towards the process's memory); the file is removed when the run ends, whatever happens.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.io import WRITE_CHUNK
from surgery.execution.placement import cpu_available_memory

AUTO_SHARE = 0.8  # --memory-budget auto: this share of the memory available when the run starts


@dataclass(frozen=True)
class MemoryBudget:
    """How much CPU memory a model run may use for weights and hidden states."""

    limit: int  # bytes
    text: str  # how the user set it, for messages

    @classmethod
    def parse(cls, text: str | None) -> "MemoryBudget":
        from surgery.units import format_bytes, parse_size

        if text is None or str(text).strip().lower() == "auto":
            limit = int(cpu_available_memory() * AUTO_SHARE)
            return cls(limit, f"auto ({AUTO_SHARE:.0%} of available memory: {format_bytes(limit)})")
        try:
            limit = parse_size(text)
        except SurgeryError:
            raise SurgeryError(f"--memory-budget {text!r}: expected auto or a size such as 4GiB, 800MB") from None
        if limit <= 0:
            raise SurgeryError(f"--memory-budget {text!r}: must be positive")
        return cls(limit, f"--memory-budget {text}")


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
        import torch

        kept = value.dtype if value.dtype in (torch.bfloat16, torch.float16) else torch.float32
        value = value.detach().to("cpu", kept).contiguous()
        if self._fd is None:
            self._memory[batch] = value
            return
        data = value.view(torch.uint8).reshape(-1).numpy()
        written = 0
        while written < data.nbytes:  # WRITE_CHUNK at a time (surgery.io.write_all says why)
            written += os.pwrite(self._fd, data[written:written + WRITE_CHUNK], self._end + written)
        self._blocks[batch] = (self._end, tuple(value.shape), kept, data.nbytes)
        self._end += data.nbytes

    def get(self, batch: int, device: str = "cpu", dtype=None):
        import torch

        from surgery.safetensors_format import pread_exact

        if self._fd is None:
            value = self._memory[batch]
        else:
            offset, shape, kept, nbytes = self._blocks[batch]
            raw = pread_exact(self._fd, nbytes, offset, self._path, f"hidden states of batch {batch}")
            value = torch.frombuffer(raw, dtype=kept).reshape(shape)
        return value.to(device=device, dtype=dtype or torch.float32)

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
