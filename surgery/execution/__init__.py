"""Running models: layer-by-layer execution, the calibration set, and what calibration fits.

* ``calibration``: the one calibration set (token rows from text or ids, batched and checked);
* ``weights``: a model's weights in transformers' in-memory layout, from a checkpoint or a plan;
* ``skeleton``: transformers' own model on the meta device, and how the runner uses it;
* ``runner``: every batch through one decoder layer at a time (``LayerRunner``), with probes;
* ``hidden``: the hidden states between layers and the memory budget that places them;
* ``routers``: the router fitters (one entry point, ``fit_router``) and router measurements;
* ``session``: what every command that runs a model shares (device, budget, collectors).
"""
