"""What `surgery inspect`, `validate` and `verify` compute, and the check a writing command runs on its output.

* ``inspection`` (+ ``inspection_view``): a checkpoint's architecture, layout, parameter counts and problems;
* ``structure``: the header-level check of a checkpoint (tensors and shapes per config.json, index, NaN/Inf);
* ``manifest``: a written checkpoint against its sha256 manifest (``surgery verify``);
* ``validation`` (+ ``evaluation``, ``metrics``): loss on a sample, comparisons with references, routing;
* ``compare``: two models layer by layer on the same inputs (``--expect-exact``, ``--verify``);
* ``post_write``: ``--verify`` of every writing command;
* ``report_view``: what validate and ``--verify`` print.
"""
