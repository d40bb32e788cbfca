"""Where a model runs: device, compute dtype, and (whole-model loads on GPUs) a device map.

auto picks the GPU when there is one (bfloat16 there by default) and the CPU otherwise (float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from surgery.errors import SurgeryError
from surgery.execution.loading import resolve_dtype
from surgery.process_memory import available_memory as cpu_available_memory

GPU_HEADROOM = 0.85  # fraction of free GPU memory the weights may take (the rest: activations)


@dataclass
class Placement:
    device: str  # where inputs go; "cuda", "cuda:1" or "cpu"
    dtype: object  # torch.dtype
    device_map: str | None = None  # "auto" when the model is spread by accelerate
    notes: list = field(default_factory=list)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def resolve(cls, device: str = "auto", dtype: str = "auto") -> "Placement":
        """Device and compute dtype for layer-by-layer runs (one layer at a time: no device map)."""
        return resolve_placement(device, dtype, 0)


def free_gpu_memory() -> list[int]:
    """Free bytes of every visible CUDA device ([] without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count())]


def resolve_placement(device: str = "auto", dtype: str = "auto", parameters: int = 0, gpus: list[int] | None = None,
                      label: str = "MODEL") -> Placement:
    """Device, dtype and device map for a model of `parameters` parameters.

    `gpus` is the free memory of each visible GPU (queried when None). auto picks CUDA when there is
    one (bfloat16 by default there) and the CPU otherwise (float32). A model whose weights exceed
    GPU_HEADROOM of one GPU's free memory is spread over all visible GPUs with accelerate's
    ``device_map="auto"`` (which offloads to CPU what still does not fit).
    """
    gpus = free_gpu_memory() if gpus is None else list(gpus)
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device.startswith("cuda"):
        if not gpus:
            raise SurgeryError(f"--device {device}: no CUDA device is available (torch {torch.__version__})")
        index_text = device.partition(":")[2] or "0"
        if not index_text.isdigit() or int(index_text) >= len(gpus):
            raise SurgeryError(f"--device {device}: expected cuda or cuda:N with N < {len(gpus)} visible GPU(s)")
        index = int(index_text)
    elif device != "cpu":
        raise SurgeryError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    torch_dtype = resolve_dtype(dtype, device)
    placement = Placement(device, torch_dtype)
    if device.startswith("cuda"):
        weight_bytes = parameters * torch.empty((), dtype=torch_dtype).element_size()
        if weight_bytes > GPU_HEADROOM * gpus[index]:
            where = f"{len(gpus)} GPU(s) ({_gib(sum(gpus))} free in all)"
            if sum(gpus) * GPU_HEADROOM < weight_bytes:
                where += ", the rest offloaded to CPU"
            placement.device_map = "auto"
            placement.notes.append(f"{label} ({_gib(weight_bytes)} in {placement.dtype_name}) does not fit on "
                                   f"{device} ({_gib(gpus[index])} free): spread over {where} with accelerate "
                                   f"device_map='auto'")
    return placement


def _gib(count: float) -> str:
    return f"{count / 2**30:.1f} GiB"


def available_memory(placement: Placement) -> int:
    """Free bytes where the weights go: GPU memory (all GPUs with a device map) or CPU MemAvailable."""
    if placement.device.startswith("cuda"):
        gpus = free_gpu_memory()
        if placement.device_map:
            return sum(gpus)
        return gpus[int(placement.device.partition(":")[2] or 0)]
    return cpu_available_memory()
