"""The sha256 of each shard, computed while the shard is written.

``TailHasher`` is a thread that follows the writer through the file, reading back each range (from the
page cache) once it is complete, so hashing overlaps writing; the digests go into the manifest.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from surgery.io import COPY_CHUNK


class TailHasher(threading.Thread):
    """sha256 of a file while it is being written: follows the writer, reading back (from the page
    cache) each range as soon as it is complete, so hashing overlaps writing instead of following it."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = path
        self.digest = hashlib.sha256()
        self.written = 0
        self.finished = False
        self.error: BaseException | None = None
        self.condition = threading.Condition()

    def advance(self, written: int, finished: bool = False) -> None:
        with self.condition:
            self.written, self.finished = written, finished
            self.condition.notify()

    def run(self) -> None:
        try:
            position = 0
            # one buffer for every read: fresh buffers of varying size make glibc keep freed heap
            # memory, so peak RSS grew with the number of tensors in a shard (bench/bench_scale.py)
            buffer = memoryview(bytearray(COPY_CHUNK))
            with open(self.path, "rb", buffering=0) as handle:
                while True:
                    with self.condition:
                        while position >= self.written and not self.finished:
                            self.condition.wait()
                        limit, finished = self.written, self.finished
                    while position < limit:
                        got = handle.readinto(buffer[:min(COPY_CHUNK, limit - position)])
                        if not got:
                            raise OSError(f"{self.path}: ended at {position} bytes while hashing")
                        self.digest.update(buffer[:got])
                        position += got
                    if finished and position >= self.written:
                        return
        except BaseException as exc:  # reported by result()
            self.error = exc

    def result(self) -> str:
        self.advance(self.written, finished=True)
        self.join()
        if self.error is not None:
            raise self.error
        return self.digest.hexdigest()
