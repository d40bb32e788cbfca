"""The machinery of `surgery merge` (Branch-Train-MiX: domain-trained copies of one seed become one MoE).

(Named ``btx``, not ``merge``: a package ``surgery.merge`` would shadow the API function ``surgery.merge``.)

* ``spec``: what a merge is asked to do, from options or our YAML; ``mergekit``: a mergekit-moe config read onto
  it; ``config_file``: which of the two a YAML file is;
* ``compatibility``: whether the models can be merged; ``members``: the merge with its models opened;
* ``plan`` (+ ``card``): every output tensor's recipe, and the model card;
* ``run``: writing it; with calibration, the draft run layer by layer: ``routers`` (the routers and shared-expert
  gate fitted), ``regmean`` (the non-FFN linear layers fitted to the models' inputs), ``head_fit`` (the head
  refitted to the experts' next-token distributions).
"""
