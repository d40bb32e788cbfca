"""The streaming writer's parts (``surgery.writer`` runs them for a whole plan).

``sharding`` lays a plan's tensors out in shards and says how each is produced; ``tensor_bytes``
writes one tensor's bytes (a kernel copy, a checked copy or a computed value); ``finite`` refuses
NaN/Inf on the way; ``hashing`` hashes each shard while it is written; ``read_ahead`` asks the kernel
for the next tensors' inputs early; ``deferred`` holds the tensors whose values need the written
model. ``COPY_CHUNK`` is the step by which they read, write and hash.
"""

COPY_CHUNK = 16 * 2**20  # bytes per read/write/hash step: small enough to keep RSS flat
