"""Process-wide allocator settings that keep a run's peak RSS flat: glibc's malloc and the CPU kernel caches.

Each is set only where the user has not set it (an environment variable wins), once per process, before the
threads and products they concern: ``bound_process_memory`` runs where surgery starts a thread or a model
run. Figures: the 168M-parameter calibrated merge (seed + 3 experts, 2048 tokens per domain, bfloat16, 2 CPU
cores); bench/bench_btx.py measures the whole run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from pathlib import Path

MMAP_THRESHOLD = 2**20  # bytes: larger allocations get their own mapping, returned to the system when freed
ARENAS = 1  # glibc malloc arenas for the whole process
KERNEL_CACHE_ENTRIES = "16"  # oneDNN primitives and PyTorch's ideep computations kept for reuse (each default: 1024)


@functools.lru_cache(maxsize=1)
def bound_process_memory() -> None:
    """- glibc raises its mmap threshold after large blocks are freed, so the next layers' tensors come from a
      heap it never shrinks and peak RSS creeps up layer after layer; a fixed threshold keeps every large
      tensor in its own mapping, unmapped when freed (peak RSS 1115 -> 933 MiB).
    - glibc gives every thread that allocates its own arena, whose free memory no other thread reuses: the
      imports surgery runs in background threads (torch, transformers' modeling code, while a draft is
      written) left their heap beside the main thread's; one arena: peak 593 -> 565 MiB, same wall time.
    - A bfloat16 matrix product on the CPU goes through oneDNN, which compiles a kernel for every new shape
      and caches it (ONEDNN_PRIMITIVE_CACHE_CAPACITY), as does PyTorch's ideep layer (LRU_CACHE_CAPACITY).
      An MoE layer's experts see a different token count in almost every call, so both caches fill to their
      default 1024 entries: peak RSS 818 -> 669 MiB with 16 entries each, wall time unchanged (13.0 vs 13.3 s,
      two runs each). The capacities are read at the first bfloat16 product.
    - MKL keeps the buffers of its float32 products for reuse (its "fast memory manager"), about 10 MiB
      resident between layers; MKL_DISABLE_FAST_MM frees them (layer-start RSS 441 -> 431 MiB, highest phase
      peak 512 -> 506 MiB on the float32 merge with --memory-budget 200MB). Set by the runner, after torch had
      loaded and run, it changed nothing: the command line sets it when it starts (``cli.main``).
    """
    for variable in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(variable, KERNEL_CACHE_ENTRIES)
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
    libc = _libc()
    if libc is None:
        return
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    if "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(-8, ARENAS)  # M_ARENA_MAX


def trim_heap() -> None:
    """Hand the free pages inside glibc's heap back to the system: a layer's run leaves 40-60 MiB of them
    resident (layer-end RSS 520 -> 470 MiB when trimmed after each layer)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc, for its allocator's settings; None where the C library is another (nothing to tune there)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # glibc's own calls
    except (OSError, AttributeError):
        return None
    return libc


def available_memory() -> int:
    """The kernel's MemAvailable: memory a new allocation can get without swapping."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
