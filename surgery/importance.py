"""Calibration statistics of a dense model's FFN neurons, for the data-driven split strategies.

h = act(gate_proj x) * (up_proj x) is the input of down_proj; neuron i's value on a token is h_i.
All statistics come from the dense source loaded once (``surgery.loading.load_model``), run on a
calibration text (or pre-tokenised ids) with hooks, and are reduced while running so that no
[tokens x neurons] tensor of every layer is kept in float:

* calibration clusters: k-means of per-sequence mean final hidden states (one cluster per expert),
  or contiguous chunks of the token stream when there are too few sequences;
* importance: per cluster, mean over its tokens of |h_i * dL/dh_i| (L: next-token loss, summed);
* firing: per token, which neurons have |h| above the layer's quantile (packed bits);
* router targets: router inputs (post-attention norm output) and, per token, each expert's
  activation mass sum |h_i| over its neurons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from surgery.errors import SurgeryError

TOKEN_FILE_SUFFIXES = (".npy", ".pt", ".jsonl")
FIRING_QUANTILE = 0.9  # a neuron "fires" on a token when |h| is in the top 10% of the layer's |h| values
BATCH_SIZE = 8
SEQ_LEN = 256
MIN_SEQUENCES_PER_CLUSTER = 2


@dataclass
class Calibration:
    """Calibration batches (tokenised once, kept as ids) and the dense model, loaded on first use."""

    source_dir: Path
    path: Path
    max_tokens: int
    batches: list = field(default_factory=list)
    _model: object = None

    @classmethod
    def prepare(cls, source_dir, path, max_tokens: int, config: dict) -> "Calibration":
        """Read and tokenise the calibration file now, so bad input is refused before any heavy work."""
        from surgery import samples

        path, source_dir = Path(path), Path(source_dir)
        if max_tokens < 2:
            raise SurgeryError(f"--calibration-tokens {max_tokens}: expected at least 2")
        seq_len = min(SEQ_LEN, int(config.get("max_position_embeddings") or SEQ_LEN))
        vocab = config.get("vocab_size")
        if path.suffix in TOKEN_FILE_SUFFIXES:
            rows = [piece for row in samples.read_token_ids(path) for piece in samples.chunk_rows(row, seq_len)]
            pad = config.get("pad_token_id")
            batches = samples.batches(rows, BATCH_SIZE, seq_len, pad if isinstance(pad, int) else 0, max_tokens, vocab)
        else:
            text = samples.read_text(path)
            from surgery.loading import load_tokenizer

            tokenizer = load_tokenizer(source_dir)
            if tokenizer is None:
                raise SurgeryError(f"{source_dir}: no tokenizer files, so calibration text {path} cannot be tokenised; "
                                   f"pass pre-tokenised ids with --calibration FILE.jsonl/.npy/.pt")
            batches = samples.text_batches(tokenizer, text, BATCH_SIZE, seq_len, max_tokens, vocab)
        batches = list(batches)
        if sum(batch.tokens for batch in batches) < 2:
            raise SurgeryError(f"{path}: calibration data gives fewer than 2 tokens")
        return cls(source_dir, path, max_tokens, batches)

    @property
    def tokens(self) -> int:
        return sum(batch.tokens for batch in self.batches)

    @property
    def model(self):
        if self._model is None:
            from surgery.loading import load_model

            model = load_model(self.source_dir, "cpu", "float32")
            for name, parameter in model.named_parameters():  # gradients are taken w.r.t. activations only
                parameter.requires_grad_(False)
                if not bool(parameter.isfinite().all()):
                    raise SurgeryError(f"{self.source_dir}: parameter {name} holds NaN or Inf values; "
                                       f"calibration statistics would be meaningless")
            self._model = model
        return self._model

    def close(self) -> None:
        self._model = None


def _down_projections(model, layers):
    from surgery.calibration import decoder_layers

    blocks = decoder_layers(model)
    return {layer: blocks[layer].mlp.down_proj for layer in layers}


# ----------------------------------------------------------------------------- clusters
def token_clusters(calibration: Calibration, count: int, seed: int) -> tuple[list, str]:
    """Per batch a LongTensor [B, T] of cluster ids (-1 on padding), and how they were made."""
    import torch

    sequences = [(b, row) for b, batch in enumerate(calibration.batches) for row in range(batch.input_ids.shape[0])]
    labels = None
    if len(sequences) >= MIN_SEQUENCES_PER_CLUSTER * count:
        means = []
        model = calibration.model
        with torch.no_grad():
            for batch in calibration.batches:
                hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
                mask = batch.attention_mask.unsqueeze(-1).float()
                means.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).double().numpy())
        from sklearn.cluster import KMeans

        points = np.concatenate(means)
        found = KMeans(n_clusters=count, n_init=4, random_state=seed).fit(points).labels_
        if len(np.unique(found)) == count:
            labels = found
    out = []
    if labels is not None:
        start = 0
        for batch in calibration.batches:
            rows = batch.input_ids.shape[0]
            ids = torch.as_tensor(labels[start:start + rows], dtype=torch.long)[:, None].expand_as(batch.input_ids)
            out.append(torch.where(batch.attention_mask.bool(), ids, torch.full_like(ids, -1)))
            start += rows
        return out, f"k-means of {len(sequences)} sequences"
    total, seen = calibration.tokens, 0
    for batch in calibration.batches:  # contiguous chunks of the token stream, in reading order
        mask = batch.attention_mask.bool()
        position = seen + torch.cumsum(mask.reshape(-1).long(), 0).reshape(mask.shape) - 1
        ids = torch.clamp(position * count // max(total, 1), max=count - 1)
        out.append(torch.where(mask, ids, torch.full_like(ids, -1)))
        seen += int(mask.sum())
    return out, f"{count} contiguous chunks of {total} tokens"


# ----------------------------------------------------------------------------- neuron statistics
@dataclass
class NeuronStatistics:
    importance: dict = field(default_factory=dict)  # layer -> float64 [clusters, ffn]
    firing: dict = field(default_factory=dict)  # layer -> uint8 [tokens, ceil(ffn/8)]
    clusters: str = ""
    tokens: int = 0


def neuron_statistics(calibration: Calibration, layers: list[int], *, clusters: int, seed: int,
                      importance: bool, firing: bool, progress=None) -> NeuronStatistics:
    """Importance per calibration cluster and/or firing bits, for every layer in one pass over the data."""
    import torch

    model = calibration.model
    stats = NeuronStatistics(tokens=calibration.tokens)
    labels, stats.clusters = token_clusters(calibration, clusters, seed) if importance else ([None] * len(calibration.batches), "")
    downs = _down_projections(model, layers)
    ffn = {layer: module.in_features for layer, module in downs.items()}
    sums = {layer: torch.zeros(clusters, ffn[layer], dtype=torch.float64) for layer in layers}
    counts = torch.zeros(clusters, dtype=torch.float64)
    thresholds: dict[int, float] = {}
    bits = {layer: [] for layer in layers}
    state = {}

    def pre_hook(layer):
        def hook(_module, args):
            h = args[0]
            keep = state["mask"]
            if firing:
                values = h.detach().reshape(-1, ffn[layer])[keep].abs()
                if layer not in thresholds:
                    thresholds[layer] = _quantile(values, FIRING_QUANTILE)
                bits[layer].append(np.packbits((values > thresholds[layer]).numpy(), axis=1))
            if importance and h.requires_grad:
                saved = h.detach()

                def grad_hook(grad):
                    flat = (saved * grad).abs().reshape(-1, ffn[layer]).double()
                    ids = state["labels"]
                    sums[layer].index_add_(0, ids[ids >= 0], flat[ids >= 0])
                h.register_hook(grad_hook)
        return hook

    handles = [downs[layer].register_forward_pre_hook(pre_hook(layer)) for layer in layers]
    embed = model.get_input_embeddings()
    try:
        for number, (batch, batch_labels) in enumerate(zip(calibration.batches, labels)):
            state["mask"] = batch.attention_mask.reshape(-1).bool()
            if importance:
                state["labels"] = batch_labels.reshape(-1)
                counts += torch.bincount(state["labels"][state["labels"] >= 0], minlength=clusters).double()
                embeds = embed(batch.input_ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
                _next_token_loss(logits, batch).backward()
            else:
                with torch.no_grad():
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            if progress:
                progress(number + 1)
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    if importance:
        for layer in layers:
            stats.importance[layer] = (sums[layer] / counts.clamp(min=1)[:, None]).numpy()
    if firing:
        for layer in layers:
            stats.firing[layer] = np.concatenate(bits[layer])
    return stats


def _next_token_loss(logits, batch):
    """Sum over real tokens of the next-token cross-entropy (targets on padding are ignored)."""
    import torch

    targets = batch.input_ids[:, 1:].clone()
    targets[batch.attention_mask[:, 1:] == 0] = -100
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             targets.reshape(-1), ignore_index=-100, reduction="sum")


def _quantile(values, q: float) -> float:
    flat = values.reshape(-1).numpy()
    if flat.size > 4_000_000:  # a strided sample is plenty for a threshold
        flat = flat[:: flat.size // 4_000_000 + 1]
    return float(np.quantile(flat, q)) if flat.size else 0.0


# ----------------------------------------------------------------------------- router targets
def router_targets(calibration: Calibration, layers: list[int], members: dict) -> tuple[dict, dict]:
    """({layer: router inputs [tokens, hidden]}, {layer: expert mass [tokens, experts]}).

    `members[layer]` is a float32 [ffn, experts] 0/1 matrix: neuron i belongs to expert j. The mass of
    expert j on a token is sum over its neurons of |h_i|.
    """
    import torch

    from surgery.calibration import router_inputs

    model = calibration.model
    downs = _down_projections(model, layers)
    masses = {layer: [] for layer in layers}
    state = {}
    membership = {layer: torch.as_tensor(members[layer], dtype=torch.float32) for layer in layers}

    def pre_hook(layer):
        def hook(_module, args):
            h = args[0].detach().reshape(-1, args[0].shape[-1])[state["mask"]].float()
            masses[layer].append(h.abs() @ membership[layer])
        return hook

    def batches():
        for batch in calibration.batches:
            state["mask"] = batch.attention_mask.reshape(-1).bool()
            yield batch

    handles = [downs[layer].register_forward_pre_hook(pre_hook(layer)) for layer in layers]
    try:
        inputs = router_inputs(model, batches(), layers)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, {layer: torch.cat(values)[: len(inputs[layer])] for layer, values in masses.items()}
