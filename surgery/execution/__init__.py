"""Running models: layer-by-layer execution, the calibration set, and what calibration measures and fits.

* ``calibration``: the one calibration set (token rows from text or ids, batched and checked);
* ``placement``: where a model runs (device, compute dtype; a device map for whole-model loads);
* ``weights``: a model's weights in transformers' in-memory layout, from a checkpoint or a plan;
* ``skeleton``: transformers' own model on the meta device, and how the runner uses it;
* ``runner``: every batch through one decoder layer at a time (``LayerRunner``), with probes;
* ``probes``: what a pass through a layer lets its caller see (``Probe``) and the hooks that deliver it;
* ``layer_calls``: the per-layer arguments recorded for each batch, shared between batches and cut
  to row chunks;
* ``hidden``: the hidden states between layers and the memory budget that places them;
* ``session``: what every command that runs a model shares (--device, --compute-dtype,
  --memory-budget, collecting probes);
* ``routers``: the router fitters (one entry point, ``fit_router``) and router measurements;
* ``neurons``: FFN neuron statistics (firing, importance, expert masses, calibration clusters);
* ``compare``: MODEL against a reference layer by layer (``--verify``, ``--expect-exact``);
* ``evaluation`` and ``metrics``: validate's whole-model and layer-by-layer passes and their sums.
"""
