"""What every operation shares, so each one is only its options, its checks and its plan.

An operation (copy, upcycle, split, merge) is an options dataclass checked before any I/O, a plan
built from headers, and ``write``: the one streaming writer, then the one post-write check
(``--verify``). It returns a ``Result``. The command line (one click command per operation, its
shared flags from ``output_options`` and ``run_options``) and the Python API (``surgery.api``) are
two thin layers over the same functions.

* ``output``: ``OutputOptions`` (--max-shard-size, --force, --dry-run, --json, --verify ...), the
  click decorator that builds it, and ``write``;
* ``result``: ``Result``, what an operation returns.
"""
