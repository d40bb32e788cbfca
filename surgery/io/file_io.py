"""Positioned reads and chunked writes: how every part of surgery moves bytes between files and memory.

Reads are ``os.preadv`` into buffers the caller owns (no mapping: the pages of a mapped file count towards
the process's memory for as long as the mapping lives); writes go out in pieces of ``WRITE_CHUNK``.
"""

from __future__ import annotations

import os
from pathlib import Path

from surgery.errors import SurgeryError

COPY_CHUNK = 16 * 2**20  # bytes per read/write/hash step of the writer: small enough to keep RSS flat
WRITE_CHUNK = 128 * 2**10  # bytes per write(2) call (see write_all)


def write_all(handle, data) -> None:
    """Write bytes-like `data` to `handle` in pieces of at most WRITE_CHUNK bytes.

    One write(2) of many MiB ran 6-30x slower than the same bytes in 128 KiB writes on this project's
    Linux 6.18 VM (2.5 GB: 7-33 s against about 1 s, every size from 256 KiB up slow at times, 128 KiB
    and below never; `cat` writes 128 KiB too). Smaller writes cost nothing measurable elsewhere."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), WRITE_CHUNK):
        handle.write(view[start:start + WRITE_CHUNK])


def pread_exact(fd: int, count: int, offset: int, file: Path, name: str) -> bytearray:
    """Read exactly `count` bytes at `offset`; a short read means the file changed or is truncated."""
    buffer = bytearray(count)
    pread_into(fd, memoryview(buffer), offset, file, name)
    return buffer


def pread_into(fd: int, view: memoryview, offset: int, file: Path, name: str) -> None:
    """Fill `view` with the bytes at `offset`; a short read means the file changed or is truncated."""
    count, done = len(view), 0
    while done < count:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise SurgeryError(f"{file}: tensor {name!r}: read {done} of {count} bytes at offset {offset}: file truncated")
        done += got
