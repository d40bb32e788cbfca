"""The machinery of the commands that change an MoE's experts: ``surgery prune``, ``extract`` and ``add-experts``.

* ``scores`` (criteria, random scores, the scores file) and ``scoring`` (the calibrated scoring pass);
* ``prune_plan``: the best-scored experts kept as byte copies;
* ``extract_plan``: one dense FFN per layer from the experts;
* ``add_plan`` and ``add_routers``: dense models' FFNs appended as experts, their router rows fitted on the draft.
"""
