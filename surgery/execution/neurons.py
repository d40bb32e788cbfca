"""Calibration statistics of a dense FFN's neurons, gathered by probes while the model runs layer by layer.

h = act(gate_proj x) * (up_proj x) is the input of down_proj; neuron i's value on a token is h_i.
Each statistic is reduced batch by batch, so no [tokens x neurons] float tensor of the token set
is kept:

* ``FiringBits``: per token, which neurons have |h| above the layer's quantile (packed bits; the
  threshold is the quantile of the first batch's values);
* ``ImportanceSums``: per calibration cluster, the sum over its tokens of |h_i * dL/dh_i| (from a
  backward pass, L = next-token loss summed over the batch);
* ``ExpertMass``: per token, each expert's activation mass sum |h_i| over its neurons (the target
  of a split's calibrated router);
* ``token_clusters``: calibration clusters, by k-means of per-sequence mean final hidden states
  (contiguous chunks of the token stream when there are too few sequences).
"""

from __future__ import annotations

import numpy as np
import torch

FIRING_QUANTILE = 0.9  # a neuron "fires" on a token when |h| is in the top 10% of the layer's |h| values
MIN_SEQUENCES_PER_CLUSTER = 2
QUANTILE_SAMPLE = 4_000_000  # values; a strided sample is plenty for a threshold


def down_input_path(family) -> str:
    """The dense FFN's down projection inside a decoder layer (its input is h)."""
    return family.spec("ffn", "down").template.split("{layer}.", 1)[1].removesuffix(".weight")


class FiringBits:
    def __init__(self, quantile: float = FIRING_QUANTILE):
        self.quantile = quantile
        self.threshold = None
        self.parts = []

    def __call__(self, _batch: int, rows) -> None:
        values = rows.float().abs().cpu()
        if self.threshold is None:
            flat = values.reshape(-1).numpy()
            if flat.size > QUANTILE_SAMPLE:
                flat = flat[:: flat.size // QUANTILE_SAMPLE + 1]
            self.threshold = float(np.quantile(flat, self.quantile)) if flat.size else 0.0
        self.parts.append(np.packbits((values > self.threshold).numpy(), axis=1))

    def bits(self) -> np.ndarray:
        return np.concatenate(self.parts)


class ImportanceSums:
    """Σ over each cluster's tokens of |h * dL/dh|; `labels[batch]` gives each real token's cluster (-1: none)."""

    def __init__(self, ffn: int, clusters: int, labels: list):
        self.sums = torch.zeros(clusters, ffn, dtype=torch.float64)
        self.labels = labels

    def __call__(self, batch: int, rows, grads) -> None:
        ids = self.labels[batch].to(rows.device)
        chosen = ids >= 0
        values = (rows * grads).abs().double()
        self.sums.index_add_(0, ids[chosen].cpu(), values[chosen].cpu())

    def mean(self, counts) -> np.ndarray:
        return (self.sums / counts.clamp(min=1)[:, None]).numpy()


class ExpertMass:
    """Per token: each expert's mass sum |h_i| over its neurons (`members`: [ffn, experts] 0/1 matrix)."""

    def __init__(self, members):
        self.members = torch.as_tensor(members, dtype=torch.float32)
        self.parts = []

    def __call__(self, _batch: int, rows) -> None:
        self.parts.append(rows.float().abs().cpu() @ self.members)

    def tensor(self):
        return torch.cat(self.parts)


def membership(partition, ffn: int) -> np.ndarray:
    """[ffn, experts]: 1 where neuron i belongs to routed expert j."""
    matrix = np.zeros((ffn, partition.num_experts), dtype=np.float32)
    for j, expert in enumerate(partition.experts):
        matrix[expert, j] = 1.0
    return matrix


def token_clusters(batches: list, sequence_means, count: int, seed: int) -> tuple[list, str]:
    """Per batch, the cluster of each real token ([real tokens] LongTensor, -1 never), and how they were made.

    `sequence_means`: [sequences, hidden] mean final hidden state of each sequence, in batch order.
    """
    sequences = len(sequence_means)
    labels = None
    if sequences >= MIN_SEQUENCES_PER_CLUSTER * count:
        from sklearn.cluster import KMeans  # lazy: only the importance splits cluster sequences

        found = KMeans(n_clusters=count, n_init=4, random_state=seed).fit(np.asarray(sequence_means)).labels_
        if len(np.unique(found)) == count:
            labels = found
    out = []
    if labels is not None:
        start = 0
        for batch in batches:
            rows = batch.input_ids.shape[0]
            ids = torch.as_tensor(labels[start:start + rows], dtype=torch.long)[:, None].expand_as(batch.input_ids)
            out.append(ids[batch.attention_mask.bool()])
            start += rows
        return out, f"k-means of {sequences} sequences"
    total = sum(batch.tokens for batch in batches)
    seen = 0
    for batch in batches:  # contiguous chunks of the token stream, in reading order
        tokens = batch.tokens
        positions = torch.arange(seen, seen + tokens)
        out.append(torch.clamp(positions * count // max(total, 1), max=count - 1))
        seen += tokens
    return out, f"{count} contiguous chunks of {total} tokens"


def next_token_loss(logits, batch):
    """Sum over real tokens of the next-token cross-entropy (targets on padding are ignored)."""
    targets = batch.input_ids[:, 1:].clone().to(logits.device)
    targets[batch.attention_mask[:, 1:].to(logits.device) == 0] = -100
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             targets.reshape(-1), ignore_index=-100, reduction="sum")
