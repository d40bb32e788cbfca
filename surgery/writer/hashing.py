"""The sha256 of each shard, computed while the shard is written.

``TailHasher`` is a thread that follows the writer through the file, reading back each range (from the
page cache) once it is complete, so hashing overlaps writing; the digests go into the manifest.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from surgery.io.dtypes import DTYPE_SIZES
from surgery.io.file_io import COPY_CHUNK


class TailHasher(threading.Thread):
    """sha256 of a file while it is being written: follows the writer, reading back (from the page
    cache) each range as soon as it is complete, so hashing overlaps writing instead of following it.

    It also checks for NaN/Inf the byte ranges the writer hands it (``check``): a tensor the kernel copied
    (``os.copy_file_range``) is checked here, on the bytes that are read back for the hash anyway, in this
    thread, instead of being read into the writer's memory first. A failed check is raised by ``result`` and
    ``settle``."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = path
        self.digest = hashlib.sha256()
        self.written = 0
        self.position = 0  # bytes hashed (and checked) so far
        self.finished = False
        self.error: BaseException | None = None
        self.condition = threading.Condition()
        self.checks: list[tuple[int, int, str, str]] = []  # (start, end, dtype, where), in file order
        self.checker = None

    def check(self, start: int, end: int, dtype: str, where: str, checker) -> None:
        """Check bytes start:end (one tensor's values of `dtype`) for NaN/Inf when they are hashed; `where`
        names them in the error. Called before the writer advances past them."""
        with self.condition:
            self.checker = checker
            self.checks.append((start, end, dtype, where))

    def advance(self, written: int, finished: bool = False) -> None:
        with self.condition:
            self.written, self.finished = written, finished
            self.condition.notify_all()

    def settle(self) -> None:
        """Wait until every byte advanced so far is hashed and checked; raise what the checks found."""
        with self.condition:
            while self.error is None and self.position < self.written and self.is_alive():
                self.condition.wait(0.05)
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        try:
            position, next_check = 0, 0
            # one buffer for every read: fresh buffers of varying size make glibc keep freed heap
            # memory, so peak RSS grew with the number of tensors in a shard (bench/bench_scale.py)
            buffer = memoryview(bytearray(COPY_CHUNK))
            with open(self.path, "rb", buffering=0) as handle:
                while True:
                    with self.condition:
                        while position >= self.written and not self.finished:
                            self.condition.wait()
                        limit, finished = self.written, self.finished
                        checks = list(self.checks)
                    while position < limit:
                        while next_check < len(checks) and checks[next_check][1] <= position:
                            next_check += 1
                        check = checks[next_check] if next_check < len(checks) else None
                        size = min(COPY_CHUNK, limit - position)
                        inside = check is not None and check[0] <= position
                        if inside:  # whole elements only: pieces start at the tensor's start + k * COPY_CHUNK
                            size = min(size, check[1] - position)
                            size -= size % DTYPE_SIZES[check[2]] if position + size < check[1] else 0
                        elif check is not None and check[0] < position + size:
                            size = check[0] - position
                        got = handle.readinto(buffer[:size])
                        if not got:
                            raise OSError(f"{self.path}: ended at {position} bytes while hashing")
                        self.digest.update(buffer[:got])
                        if inside:
                            self.checker.check_bytes(buffer[:got], check[2], check[3])
                        position += got
                        with self.condition:
                            self.position = position
                            self.condition.notify_all()
                    if finished and position >= self.written:
                        return
        except BaseException as exc:  # reported by result()
            self.error = exc
            with self.condition:
                self.condition.notify_all()

    def result(self) -> str:
        self.advance(self.written, finished=True)
        self.join()
        if self.error is not None:
            raise self.error
        return self.digest.hexdigest()
