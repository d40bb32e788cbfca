"""The streaming writer's parts (``surgery.writer`` runs them for a whole plan).

``sharding`` lays a plan's tensors out in shards and says how each is produced; ``tensor_bytes``
writes one tensor's bytes (a kernel copy, a checked copy or a computed value); ``finite`` refuses
NaN/Inf on the way; ``hashing`` hashes each shard while it is written; ``read_ahead`` asks the kernel
for the next tensors' inputs early; ``deferred`` holds the tensors whose values need the written
model. ``COPY_CHUNK`` is the step by which they read, write and hash.
"""

COPY_CHUNK = 16 * 2**20  # bytes per read/write/hash step: small enough to keep RSS flat
WRITE_CHUNK = 128 * 2**10  # bytes per write(2) call (see write_all)


def write_all(handle, data) -> None:
    """Write bytes-like `data` to `handle` in pieces of at most WRITE_CHUNK bytes.

    One write(2) of many MiB ran 6-30x slower than the same bytes in 128 KiB writes on this project's
    Linux 6.18 VM (2.5 GB: 7-33 s against about 1 s, every size from 256 KiB up slow at times, 128 KiB
    and below never; `cat` writes 128 KiB too). Smaller writes cost nothing measurable elsewhere."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), WRITE_CHUNK):
        handle.write(view[start:start + WRITE_CHUNK])
