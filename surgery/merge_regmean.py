"""`surgery merge --non-ffn regmean`: the shared linear layers merged with each model's own inputs (RegMean).

RegMean (Jin et al., ICLR 2023, arXiv 2212.09849): for a linear layer with weights W_i in model i and
inputs X_i (model i's own activations at that layer, on its own domain's calibration text), the merged
weight minimising sum_i ||X_i W^T - X_i W_i^T||^2 is W^T = (sum_i G_i)^-1 sum_i G_i W_i^T with
G_i = X_i^T X_i. Each G_i's off-diagonal is scaled by ALPHA (the diagonal kept) so the sum stays well
conditioned; published configurations use 0.6-0.95.

Which layers: the attention projections (q, k, v: the input of the module that holds q, whatever
stores it; o: the input of o_proj) of every layer and an untied head (the final norm's output). The
embedding is a linear layer on one-hot inputs, so its G_i is diagonal (model i's token counts) and its
merge is each row weighted by the models' counts of that token (``merge_mean.TokenWeightedMean``, set by
``set_token_counts`` once the texts are tokenized). Norms and biases keep the weighted mean. The seed (the generalist) reads every domain's text;
each expert its own domain's. ``--weights`` scale each model's Gram matrices.

``--non-ffn regmean++`` (RegMean++, arXiv 2508.03121) takes X_i differently: model i's layer l runs on
the hidden states the *merged* model feeds layer l (its layers < l already merged, its routers fitted),
each model on its own domain's tokens, so each layer is merged for the inputs it will actually see
(``MergedInputs``, driven by the merged draft's layer-by-layer run in ``btx_router.fit_calibrated``).

Memory: every model runs layer by layer (``surgery.execution``), one model's layer at a time; the
Gram matrices of one layer (in float64) and the merged tensors of that layer are all that is held,
and each merged tensor is written into the draft as soon as it is computed (``patch``).
"""

from __future__ import annotations

from surgery import console
from surgery import families as arch
from surgery.recipes import Deferred

ALPHA = 0.9  # off-diagonal scale of each Gram matrix


class RegMeanTensor(Deferred):
    """A non-FFN linear weight merged by RegMean: written once every model has run up to its layer."""

    def __init__(self, source_name: str, layer: int | None, module: str, plus: bool = False, head_fit: bool = False):
        whose = "the merged model's" if plus else "each model's own"
        where = f"inputs of {module}" if module else "final-norm outputs"
        refit = ", then refitted to the experts' next-token distributions (--head-fit)" if head_fit else ""
        super().__init__(f"regmean{'++' if plus else ''} of {source_name} ({whose} {where}, alpha {ALPHA}){refit}")
        self.source_name, self.layer, self.module = source_name, layer, module


def regmean_module(family, config: dict, expected) -> str | None:
    """The module whose input feeds `expected` (an output tensor of the merge), relative to its decoder layer
    ("" for the head: the final norm's output), or None when RegMean does not apply to it."""
    if expected.group == "head":
        return ""
    if expected.group != "attention" or expected.role not in ("q", "k", "v", "o"):
        return None
    return _projection_module(family, config, expected.layer, expected.role)


def _projection_module(family, config: dict, layer: int, role: str) -> str:
    """The module holding attention projection `role` (q, k, v, o) of `layer`, relative to the layer."""
    name = family.spec("attention", role).name(layer)
    stored = arch.source_views(family, config).get(name, (name,))[0]  # Phi-3: the fused qkv_proj holds q
    return stored.split(f"layers.{layer}.", 1)[1].removesuffix(".weight")


class _Gram:
    """sum of x^T x over the rows a probe sees, in float64."""

    def __init__(self):
        self.value = None
        self.last = None  # the last batch's rows, for modules that read the same input (``_SameInput``)

    def __call__(self, batch, rows):
        import torch

        rows = rows.detach().to("cpu", torch.float32)
        gram = (rows.T @ rows).double()  # one batch's products in float32 (4x faster), summed in float64
        self.value = gram if self.value is None else self.value + gram
        self.last = rows


class _SameInput:
    """The probe of a module that reads what another module's ``_Gram`` just saw (k and v read q's input): its
    Gram matrix is that one, so it is not computed or held twice; the rows are checked to be equal."""

    def __init__(self, gram: _Gram, module: str, other: str):
        self.gram, self.module, self.other = gram, module, other

    def __call__(self, batch, rows):
        import torch

        if self.gram.last is None or not torch.equal(rows.detach().to("cpu", torch.float32), self.gram.last):
            raise AssertionError(f"regmean: the input of {self.module} differs from that of {self.other}")


BLOCK_BYTES = 16 * 2**20  # float64 bytes of one block of output rows (an lm_head is merged block by block)


def merge_blocks(grams: list, read_rows, rows: int, alpha: float = ALPHA):
    """Yield (start, float32 rows start:start+n of W) with W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T and
    G~_i = alpha G_i + (1 - alpha) diag(G_i): one factorisation, then blocks of output rows, each read from
    every model (`read_rows(i, start, stop)`: rows start:stop of W_i), so a head of any vocabulary holds one
    block per model."""
    import torch

    scaled = [alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram)) for gram in grams]
    factor, pivots = torch.linalg.lu_factor(sum(scaled))
    step = max(1, BLOCK_BYTES // (8 * scaled[0].shape[0]))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        target = sum(gram @ read_rows(i, start, stop).to(torch.float64).T for i, gram in enumerate(scaled))
        yield start, torch.linalg.lu_solve(factor, pivots, target).T.to(torch.float32).contiguous()


def merged_weight(grams: list, weights: list, alpha: float = ALPHA):
    """The whole RegMean weight (``merge_blocks``) of weights given in memory; float32."""
    import torch

    blocks = merge_blocks(grams, lambda i, start, stop: weights[i][start:stop], weights[0].shape[0], alpha)
    return torch.cat([block for _, block in blocks])


def fit_regmean(merge, plan, parts: list, settings, patch, spill_dir=None) -> None:
    """Run every averaged model layer by layer on its text and write each RegMean tensor of the plan into the
    draft (`patch`) as soon as its layer has been seen by all of them."""
    from surgery.execution.calibration import CalibrationSet

    runs = _Runs(merge, plan, CalibrationSet.combine(parts), settings, patch, spill_dir)
    console.info(f"regmean: running {len(runs.members)} models layer by layer on their own calibration text and "
                 f"merging {len(runs.tensors)} linear layers (alpha {ALPHA})")
    hidden = [runner.embed() for _, runner in runs.runs]
    layers = merge.config["num_hidden_layers"]
    with console.progress("regmean", layers + 1, unit_bytes=False) as advance:
        for layer in range(layers):
            hidden = runs.merge_layer(layer, hidden)
            advance(1, f"layer {layer}")
        runs.merge_head(hidden)
        advance(1, "head")
    for store in hidden:
        store.close()


def batch_mask(runner, batch: int, rows):
    """The real (unpadded) tokens of rows `rows` of batch `batch`, for a [rows, length, hidden] tensor."""
    return runner.batches[batch].attention_mask[rows].to(bool)


def _merge(tensor, merge, members, grams, patch) -> None:
    """Write the RegMean weight of `tensor` into the draft block by block of rows, each model's Gram matrix
    scaled by its averaging weight (--weights)."""
    name = tensor.recipe.source_name
    scaled = [gram * merge.weights[m.name] for gram, m in zip(grams, members)]
    shape = tuple(members[0].checkpoint.info(name).shape)
    if shape != tuple(tensor.shape):
        raise AssertionError(f"regmean of {name}: stored {list(shape)}, output {list(tensor.shape)}")
    read = lambda i, start, stop: members[i].checkpoint.read_rows(name, range(start, stop))  # noqa: E731
    for start, block in merge_blocks(scaled, read, shape[0], ALPHA):
        patch(tensor.name, block, start_row=start)


# ------------------------------------------------------------------ the models' runs
def member_batches(merge, calibration) -> list[tuple]:
    """[(member, batch indices of `calibration`)] for every averaged model: the inputs its Gram matrices (and
    token counts) are taken on. An expert: its own domain's batches; any other model (the seed, a shared
    expert's model): every expert's domain (not negative or shared-expert texts)."""
    experts = {e.name: index for index, e in enumerate(merge.experts)}
    count = len(merge.experts)
    out = []
    for member in (m for m in merge.members if merge.weights[m.name] != 0):
        own = experts.get(member.name)
        out.append((member, [i for i in range(len(calibration.batches))
                             if (calibration.domain_of(i) == own if own is not None else calibration.domain_of(i) < count)]))
    return out


class _Batches:
    """Batches `indices` of a HiddenStore, seen as a store of their own (read only; its owner closes it)."""

    def __init__(self, store, indices: list[int]):
        self.store, self.indices = store, indices

    def get(self, index: int, device: str = "cpu", dtype=None):
        return self.store.get(self.indices[index], device, dtype)

    def rows(self, index: int, device: str = "cpu", dtype=None, last: bool = False):
        return self.store.rows(self.indices[index], device, dtype)  # read only: the owner's batch stays

    def close(self) -> None:
        pass


class _Runs:
    """Every averaged model's layer-by-layer runner on its batches (``member_batches``), and the merge of a
    layer's (or the head's) RegMean tensors from Gram matrices of the inputs each runner sees."""

    def __init__(self, merge, plan, calibration, settings, patch, spill_dir=None):
        from surgery.execution.session import runner_for
        from surgery.execution.weights import ModelWeights

        self.merge, self.patch, self.settings, self.spill_dir = merge, patch, settings, spill_dir
        self.tensors = [t for t in plan.tensors if isinstance(t.recipe, RegMeanTensor)]
        chosen = member_batches(merge, calibration)
        self.members = [member for member, _ in chosen]
        self.runs = [(indices, runner_for(ModelWeights.from_checkpoint(member.checkpoint),
                                          [calibration.batches[i] for i in indices], settings, spill_dir))
                     for member, indices in chosen]

    def merge_layer(self, layer: int, inputs: list, stop: bool = False) -> list:
        """Run each model's layer `layer` on its `inputs` (one store per run), merge the layer's tensors into the
        draft; returns the layers' outputs (None where `stop`: the pass ends at o_proj's input, the last one
        RegMean reads)."""
        from surgery.execution.probes import Probe

        here = [t for t in self.tensors if t.recipe.layer == layer]
        modules = sorted({t.recipe.module for t in here})
        o_proj = self.merge.source_family.spec("attention", "o").name(layer)
        end = next((t.recipe.module for t in here if t.recipe.source_name == o_proj), None) if stop else None
        family, config = self.merge.source_family, self.merge.config
        projections = [_projection_module(family, config, layer, role) for role in ("q", "k", "v")]
        shared = {m: projections[0] for m in projections[1:] if m in modules and projections[0] in modules and
                  m != projections[0]}  # every attention projects q, k and v from one tensor
        grams, outputs = [], []
        for (_, runner), store in zip(self.runs, inputs):
            sums = {module: _Gram() for module in modules if module not in shared}
            probes = [Probe(module, "input", sums[module]) for module in modules if module not in shared] + [
                Probe(module, "input", _SameInput(sums[other], module, other)) for module, other in shared.items()]
            with runner.layer(layer) as session:
                outputs.append(session.run(store, probes, outputs=not stop, stop_after=end))
            store.close()
            for gram in sums.values():
                gram.last = None
            grams.append({module: sums[shared.get(module, module)].value for module in modules})
        for tensor in here:
            _merge(tensor, self.merge, self.members, [g[tensor.recipe.module] for g in grams], self.patch)
        return outputs

    def merge_head(self, inputs: list, patch=None) -> None:
        """Merge an untied head from the final-norm outputs of each model on its last hidden states `inputs`, into
        the draft or to `patch(name, rows, start_row)`."""
        head = [t for t in self.tensors if t.recipe.layer is None]
        if not head:
            return
        grams = []
        for (_, runner), store in zip(self.runs, inputs):
            gram = _Gram()
            runner.head(store, lambda batch, rows, logits, extra, gram=gram, runner=runner: gram(
                batch, extra["norm"][batch_mask(runner, batch, rows)]), norm_only=True)
            grams.append(gram.value)
        for tensor in head:
            _merge(tensor, self.merge, self.members, grams, patch or self.patch)


# ------------------------------------------------------------------ RegMean++
class MergedInputs(_Runs):
    """RegMean++: each averaged model's layer l, run on the merged model's hidden states entering layer l (each
    model on its own batches, ``member_batches``), gives that layer's Gram matrices.

    Driven by the merged draft's layer-by-layer run: ``before_layer(l, hidden)`` merges layer l's tensors and
    writes them into the draft (`patch`) before the merged layer is read from it; ``head(hidden)`` merges an
    untied head from the merged model's last hidden states."""

    def __init__(self, merge, plan, calibration, settings, patch, spill_dir=None):
        super().__init__(merge, plan, calibration, settings, patch, spill_dir)
        for _, runner in self.runs:
            runner.embed().close()  # records each batch's layer arguments (masks, positions)
        console.info(f"regmean++: each of {len(self.members)} models runs its layers on the merged model's hidden "
                     f"states to merge {len(self.tensors)} linear layers (alpha {ALPHA})")

    @property
    def needs_head(self) -> bool:
        return any(t.recipe.layer is None for t in self.tensors)

    def before_layer(self, layer: int, hidden) -> None:
        if any(t.recipe.layer == layer for t in self.tensors):
            self.merge_layer(layer, [_Batches(hidden, indices) for indices, _ in self.runs], stop=True)

    def head(self, hidden, merged_runner) -> None:
        """Merge the head from the merged model's last hidden states `hidden` (`merged_runner`: the draft's
        runner, whose final norm gives the head's inputs); with ``--head-fit``, then refit it (``head_fit``)."""
        inputs = [_Batches(hidden, indices) for indices, _ in self.runs]
        if not self.merge.spec.head_fit:
            self.merge_head(inputs)
            return
        (tensor,) = [t for t in self.tensors if t.recipe.layer is None]
        start = self._regmean_head(tensor, inputs)
        self.patch(tensor.name, fit_merged_head(self, tensor, start, hidden, merged_runner))

    def _regmean_head(self, tensor, inputs):
        """The RegMean++ head ([vocab, hidden] float32), in memory rather than written."""
        import torch

        out = torch.empty(tuple(tensor.shape), dtype=torch.float32)

        def keep(name, block, start_row):
            out[start_row:start_row + len(block)] = torch.as_tensor(block).float()

        self.merge_head(inputs, keep)
        return out


def fit_merged_head(runs: MergedInputs, tensor, start, hidden, merged_runner):
    """``--head-fit``: each expert runs on its own domain's batches (its own last hidden states and head give the
    targets), the merged model's final norm gives the features on the same batches, and ``head_fit.fit_head``
    refits `start`. Returns the fitted head ([vocab, hidden] float32)."""
    import torch

    from surgery.execution.session import runner_for
    from surgery.execution.weights import ModelWeights
    from surgery.head_fit import MAX_STEPS, Domain, fit_head, minibatch_tokens, step_products

    device = merged_runner.placement.device
    features = {}
    merged_runner.head(hidden, lambda batch, rows, logits, extra: features.setdefault(batch, []).append(
        extra["norm"][batch_mask(merged_runner, batch, rows)].float()), norm_only=True)
    experts = {e.name for e in runs.merge.experts}
    domains = []
    for member, (indices, member_runner) in zip(runs.members, runs.runs):  # each batch's rows are let go once joined
        if member.name not in experts or not indices:
            continue
        own = runner_for(ModelWeights.from_checkpoint(member.checkpoint), member_runner.batches, runs.settings,
                         runs.spill_dir)
        last, _ = own.forward(description=None)
        mine = {}
        own.head(last, lambda batch, rows, logits, extra, own=own: mine.setdefault(batch, []).append(
            extra["norm"][batch_mask(own, batch, rows)].float()), norm_only=True)
        last.close()
        head = member.checkpoint.read(tensor.recipe.source_name).float()
        domains.append(Domain(torch.cat([torch.cat(features.pop(i)) for i in indices]).to(device),
                              torch.cat([torch.cat(mine.pop(b)) for b in range(len(indices))]).to(device),
                              head.to(device)))
    console.info(f"head fit: {MAX_STEPS} steps on {device}, each about 3 x {minibatch_tokens(domains)} tokens x "
                 f"{start.shape[0]} vocab x {start.shape[1]} hidden = {step_products(start, domains) / 1e9:.3g} G "
                 "multiply-adds")
    with console.progress("fitting the head", MAX_STEPS, unit_bytes=False) as advance:
        fit = fit_head(start.to(device), domains, seed=runs.merge.spec.router_seed, progress=advance)
    console.info(f"head fit: KL to the experts on held-back calibration tokens {fit.start_kl:.4f} -> {fit.kl:.4f} "
                 f"(step {fit.step} of {fit.steps} kept)")
    return fit.head.cpu()


def set_token_counts(merge, plan, parts: list) -> None:
    """Give each ``TokenWeightedMean`` of the plan every averaged model's token counts on its batches
    (``member_batches``), real tokens only: the diagonal Gram matrices of RegMean on one-hot inputs."""
    import torch

    from surgery.execution.calibration import CalibrationSet
    from surgery.merge_mean import TokenWeightedMean

    recipes = [t.recipe for t in plan.tensors if isinstance(t.recipe, TokenWeightedMean)]
    if not recipes:
        return
    vocab = int(merge.reference.checkpoint.config["vocab_size"])
    calibration = CalibrationSet.combine(parts)
    counts = []
    for _, indices in member_batches(merge, calibration):
        batches = [calibration.batches[i] for i in indices]
        ids = torch.cat([b.input_ids[b.attention_mask.bool()].reshape(-1) for b in batches]) if batches else \
            torch.zeros(0, dtype=torch.long)
        counts.append(torch.bincount(ids.long(), minlength=vocab).double().numpy())
    for recipe in recipes:
        recipe.set_counts(counts)
