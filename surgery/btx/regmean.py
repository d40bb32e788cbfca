"""`surgery merge --non-ffn regmean`: the shared linear layers merged with each model's own inputs (RegMean).

RegMean (Jin et al., ICLR 2023, arXiv 2212.09849): for a linear layer with weights W_i in model i and
inputs X_i (model i's own activations at that layer, on its own domain's calibration text), the merged
weight minimising sum_i ||X_i W^T - X_i W_i^T||^2 is W^T = (sum_i G_i)^-1 sum_i G_i W_i^T with
G_i = X_i^T X_i. Each G_i's off-diagonal is scaled by ALPHA (the diagonal kept) so the sum stays well
conditioned; published configurations use 0.6-0.95.

Which layers: the attention projections (q, k, v: the input of the module that holds q, whatever
stores it; o: the input of o_proj) of every layer and an untied head (the final norm's output); the plan
marks them (``surgery.btx.plan.RegMeanSlot``). The embedding is a linear layer on one-hot inputs, so its G_i
is diagonal (model i's token counts) and its merge is each row weighted by the models' counts of that token
(``WeightedMean`` per row, given its counts by ``set_token_counts`` once the texts are tokenized). Norms and
biases keep the weighted mean. The seed (the generalist) reads every domain's text; each expert its own
domain's. ``--weights`` scale each model's Gram matrices.

``--non-ffn regmean++`` (RegMean++, arXiv 2508.03121) takes X_i differently: model i's layer l runs on
the hidden states the *merged* model feeds layer l (its layers < l already merged, its routers fitted),
each model on its own domain's tokens, so each layer is merged for the inputs it will actually see
(``MergedInputs``, a step of the merged draft's layer pass in ``surgery.btx.routers``).

Memory: every model runs layer by layer (the layer pass), one model's layer at a time; the Gram matrices of one
layer (in float64) and the merged tensors of that layer are all that is held, and each merged tensor is written
into the draft as soon as it is computed (``patch``).
"""

from __future__ import annotations

import torch

from surgery.btx import card
from surgery.btx.head_fit import fit_merged_head
from surgery.btx.plan import RegMeanSlot, projection_module
from surgery.execution.calibration import CalibrationSet
from surgery.execution.layer_pass import LayerPass
from surgery.execution.probes import Probe
from surgery.execution.step import Step
from surgery.execution.weights import ModelWeights
from surgery.plan.mean import WeightedMean
from surgery.plan.nodes import Deferred

BLOCK_BYTES = 16 * 2**20  # float64 bytes of one block of output rows (an lm_head is merged block by block)


class _Gram:
    """sum of x^T x over the rows a probe sees, in float64."""

    def __init__(self):
        self.value = None
        self.last = None  # the last batch's rows, for modules that read the same input (``_SameInput``)

    def __call__(self, batch, rows):
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
        if self.gram.last is None or not torch.equal(rows.detach().to("cpu", torch.float32), self.gram.last):
            raise AssertionError(f"regmean: the input of {self.module} differs from that of {self.other}")


def merge_blocks(grams: list, read_rows, rows: int, alpha: float):
    """Yield (start, float32 rows start:start+n of W) with W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T and
    G~_i = alpha G_i + (1 - alpha) diag(G_i): one factorisation, then blocks of output rows, each read from
    every model (`read_rows(i, start, stop)`: rows start:stop of W_i), so a head of any vocabulary holds one
    block per model."""
    scaled = [alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram)) for gram in grams]
    factor, pivots = torch.linalg.lu_factor(sum(scaled))
    step = max(1, BLOCK_BYTES // (8 * scaled[0].shape[0]))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        target = sum(gram @ read_rows(i, start, stop).to(torch.float64).T for i, gram in enumerate(scaled))
        yield start, torch.linalg.lu_solve(factor, pivots, target).T.to(torch.float32).contiguous()


def merged_weight(grams: list, weights: list, alpha: float):
    """The whole RegMean weight (``merge_blocks``) of weights given in memory; float32."""
    blocks = merge_blocks(grams, lambda i, start, stop: weights[i][start:stop], weights[0].shape[0], alpha)
    return torch.cat([block for _, block in blocks])


def regmean_tensors(plan) -> list:
    """The plan's output tensors RegMean merges (deferred, with their ``RegMeanSlot``)."""
    return [t for t in plan.tensors if isinstance(t.recipe, Deferred) and isinstance(t.recipe.slot, RegMeanSlot)]


class Grams(Step):
    """The Gram matrices of the inputs of a layer's RegMean modules, on one model's run of that layer (k and v
    read q's input: their Gram matrix is q's, checked equal batch by batch)."""

    def __init__(self, modules: dict, shared: dict):
        self.modules, self.shared = modules, shared  # layer -> modules; layer -> {module: the module it shares}
        self.sums = {}

    def wants(self, layer: int) -> bool:
        return layer in self.modules

    def probes(self, layer: int, session=None) -> list[Probe]:
        shared = self.shared[layer]
        self.sums = {module: _Gram() for module in self.modules[layer] if module not in shared}
        return [Probe(module, "input", self.sums[module]) for module in self.modules[layer] if module not in shared] + [
            Probe(module, "input", _SameInput(self.sums[other], module, other)) for module, other in shared.items()]

    def ran(self) -> None:
        """The layer's run is over: the last batch's rows, kept for k and v's check, are let go (each model's would
        otherwise stay until every model ran the layer)."""
        for gram in self.sums.values():
            gram.last = None

    def after(self, layer: int, session, rerun) -> None:
        self.ran()

    def take(self, layer: int) -> dict:
        """{module: Gram matrix} of the layer just run, handed over: the step keeps none (each model's are
        [hidden, hidden] float64 per module, held only until the layer is merged)."""
        sums, self.sums = self.sums, {}
        return {module: sums[self.shared[layer].get(module, module)].value for module in self.modules[layer]}


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


class Members:
    """Every averaged model's layer pass on its batches (``member_batches``), and the merge of a layer's (or the
    head's) RegMean tensors from the Gram matrices of the inputs each model sees."""

    def __init__(self, merge, plan, calibration, settings, patch, spill_dir=None):
        self.merge, self.patch, self.settings, self.spill_dir = merge, patch, settings, spill_dir
        self.tensors = regmean_tensors(plan)
        chosen = member_batches(merge, calibration)
        self.members = [member for member, _ in chosen]
        self.indices = [indices for _, indices in chosen]
        self.passes = [LayerPass.for_settings(ModelWeights.from_checkpoint(member.checkpoint),
                                              [calibration.batches[i] for i in indices], settings, spill_dir)
                       for member, indices in chosen]
        family, config = merge.source_family, merge.config
        modules, shared, self.ends = {}, {}, {}
        for layer in range(config["num_hidden_layers"]):
            here = [t.recipe.slot for t in self.tensors if t.recipe.slot.layer == layer]
            if not here:
                continue
            modules[layer] = sorted({slot.module for slot in here})
            projections = [projection_module(family, config, layer, role) for role in ("q", "k", "v")]
            shared[layer] = {m: projections[0] for m in projections[1:] if m in modules[layer]
                             and projections[0] in modules[layer] and m != projections[0]}  # q, k, v read one input
            o_proj = family.spec("attention", "o").name(layer)
            self.ends[layer] = next((slot.module for slot in here if slot.source_name == o_proj), None)
        self.grams = [Grams(modules, shared) for _ in self.passes]

    @property
    def needs_head(self) -> bool:
        return any(t.recipe.slot.layer is None for t in self.tensors)

    def merge_layer(self, layer: int) -> None:
        """Write the layer's RegMean tensors into the draft from the Gram matrices each model's pass collected."""
        if layer not in self.ends:
            return
        grams = [step.take(layer) for step in self.grams]
        for tensor in self.tensors:
            if tensor.recipe.slot.layer == layer:
                self._merge(tensor, [g[tensor.recipe.slot.module] for g in grams], self.patch)

    def merge_head(self, inputs: list, patch=None) -> None:
        """Merge an untied head from the final-norm outputs of each model on its last hidden states `inputs`, into
        the draft or to `patch(name, rows, start_row)`."""
        head = [t for t in self.tensors if t.recipe.slot.layer is None]
        if not head:
            return
        grams = []
        for layer_pass, store in zip(self.passes, inputs):
            gram = _Gram()
            layer_pass.head(store, lambda batch, rows, logits, extra, gram=gram, layer_pass=layer_pass: gram(
                batch, extra["norm"][layer_pass.real_tokens(batch, rows)]), norm_only=True)
            grams.append(gram.value)
        for tensor in head:
            self._merge(tensor, grams, patch or self.patch)

    def _merge(self, tensor, grams: list, patch) -> None:
        """Write the RegMean weight of `tensor` into the draft block by block of rows, each model's Gram matrix
        scaled by its averaging weight (--weights)."""
        name = tensor.recipe.slot.source_name
        scaled = [gram * self.merge.weights[m.name] for gram, m in zip(grams, self.members)]
        shape = tuple(self.members[0].checkpoint.info(name).shape)
        if shape != tuple(tensor.shape):
            raise AssertionError(f"regmean of {name}: stored {list(shape)}, output {list(tensor.shape)}")
        read = lambda i, start, stop: self.members[i].checkpoint.read_rows(name, range(start, stop))  # noqa: E731
        for start, block in merge_blocks(scaled, read, shape[0], card.ALPHA):
            patch(tensor.name, block, start_row=start)


def fit_regmean(merge, plan, parts: list, settings, patch, spill_dir=None) -> None:
    """Run every averaged model layer by layer on its text and write each RegMean tensor of the plan into the
    draft (`patch`) as soon as its layer has been seen by all of them."""
    members = Members(merge, plan, CalibrationSet.combine(parts), settings, patch, spill_dir)
    hidden = LayerPass.together([(layer_pass, [grams]) for layer_pass, grams in zip(members.passes, members.grams)],
                                members.merge_layer, final_output=members.needs_head, description="regmean",
                                announce=f"regmean: running {len(members.members)} models layer by layer on their "
                                         f"own calibration text and merging {len(members.tensors)} linear layers "
                                         f"(alpha {card.ALPHA})")
    members.merge_head(hidden)
    for store in hidden:
        if store is not None:
            store.close()


class MergedInputs(Members, Step):
    """RegMean++: each averaged model's layer l, run on the merged model's hidden states entering layer l (each
    model on its own batches, ``member_batches``), gives that layer's Gram matrices. A step of the merged draft's
    layer pass: ``before`` merges layer l's tensors and writes them into the draft before the merged layer is read
    from it; ``finish`` merges an untied head from the merged model's last hidden states (and refits it with
    ``--head-fit``)."""

    def __init__(self, merge, plan, calibration, settings, patch, spill_dir=None):
        super().__init__(merge, plan, calibration, settings, patch, spill_dir)
        for layer_pass in self.passes:
            layer_pass.runner()  # each model's memory plan: a budget too small is refused before the run is announced
        self.announcement = (f"regmean++: each of {len(self.members)} models runs its layers on the merged model's "
                             f"hidden states to merge {len(self.tensors)} linear layers (alpha {card.ALPHA})")

    @property
    def last_layer(self) -> int | None:
        return None if self.needs_head else max(self.ends, default=-1)

    def before(self, layer: int, hidden) -> None:
        if layer not in self.ends:
            return
        for layer_pass, grams, indices in zip(self.passes, self.grams, self.indices):
            layer_pass.run_layer(layer, _Batches(hidden, indices), grams.probes(layer), outputs=False,
                                 stop_after=self.ends[layer])
            grams.ran()
        self.merge_layer(layer)

    def finish(self, layer_pass: LayerPass, hidden) -> None:
        if not self.needs_head:
            return
        inputs = [_Batches(hidden, indices) for indices in self.indices]
        if not self.merge.spec.head_fit:
            self.merge_head(inputs)
            return
        (tensor,) = [t for t in self.tensors if t.recipe.slot.layer is None]
        start = torch.empty(tuple(tensor.shape), dtype=torch.float32)

        def keep(name, block, start_row):
            start[start_row:start_row + len(block)] = torch.as_tensor(block).float()

        self.merge_head(inputs, keep)
        self.patch(tensor.name, fit_merged_head(self, tensor, start, hidden, layer_pass))


def set_token_counts(merge, plan, parts: list) -> None:
    """Give each per-row ``WeightedMean`` of the plan every averaged model's token counts on its batches
    (``member_batches``), real tokens only: the diagonal Gram matrices of RegMean on one-hot inputs."""
    recipes = [t.recipe for t in plan.tensors if isinstance(t.recipe, WeightedMean) and t.recipe.per_row]
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
        recipe.set_row_counts(counts)
