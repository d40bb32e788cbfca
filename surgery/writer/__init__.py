"""The streaming writer: any plan into a Hugging Face style safetensors directory, one tensor at a time.

* ``stream``: ``write_plan`` (shards written header first, tensors appended as computed, a temporary
  directory renamed into place only when complete) and ``check_output_path``;
* ``shards``: how a plan's tensors are laid out in shards and how each is produced;
* ``tensor_bytes``: one tensor's bytes (a kernel copy, a checked copy or a computed value);
* ``finite_check``: NaN/Inf refused on the way; ``hashing``: each shard hashed while it is written;
* ``read_ahead``: the kernel asked for the next tensors' inputs early;
* ``deferred``: tensors whose values need the written model, written into the draft afterwards;
* ``manifest``: the sha256 manifest of every output file.
"""
