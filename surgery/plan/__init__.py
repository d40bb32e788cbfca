"""Plan, then execute: every operation builds a plan from headers before any weight is read.

* ``plan``: ``Plan`` and ``OutputTensor`` (every output tensor, its shape, dtype and recipe);
* ``nodes``: the node kinds recipes are made of (copies, rows, scaled, padded, fresh, lazy, deferred ...);
* ``mean``: the weighted mean of tensors of several checkpoints (computed in blocks of rows);
* ``sources``: the dense or MoE sources of a plan, opened and checked;
* ``moe``: what every dense -> MoE plan shares (the target's tensors in model order, inert shared experts);
* ``layouts``: an MoE plan's experts per expert or fused, and converting between the two;
* ``diversity``: noise and Drop-Upcycling on expert weights.
"""
