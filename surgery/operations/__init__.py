"""What every writing operation shares, so each command is only its options, its checks and its plan.

An operation (copy, upcycle, split, merge, prune, extract, add-experts) is an options dataclass checked before
any I/O, a plan built from headers, and ``write``: the one streaming writer, then the one post-write check
(``--verify``). It returns a ``Result``. The command line (one click command per operation) and the Python API
(``surgery.api``) are two thin layers over the same functions.

* ``output``: ``OutputOptions`` (--max-shard-size, --force, --dry-run, --json, --verify ...), the click decorator
  that builds it, and ``write``;
* ``options``: the options shared by several commands, declared once (how a model runs, calibration data,
  --dtype, --format, NAME=VALUE arguments);
* ``plan_view``: the --dry-run table; ``result``: ``Result``, what an operation returns.
"""
