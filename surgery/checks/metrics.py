"""Running sums of an evaluation: next-token loss, and MODEL against a reference.

Only sums are kept (per batch, or per chunk of rows of a batch), so memory is bounded by one
batch's logits whatever the length of the data; padding is masked out of every statistic.
"""

from __future__ import annotations

import math

import torch

from surgery.errors import SurgeryError

COMPARE_BLOCK = 2**24  # logits elements compared at once (bounded temporaries for large vocabularies)


class LossSums:
    """Next-token cross-entropy over positions whose token and next token are both real."""

    def __init__(self):
        self.total = 0.0
        self.predicted = 0

    def add(self, logits, batch) -> None:
        mask = batch.attention_mask.to(logits.device).bool()
        valid = mask & mask.roll(-1, dims=1)
        valid[:, -1] = False
        labels = batch.input_ids.to(logits.device).roll(-1, dims=1).masked_fill(~valid, -100)
        if valid.any():  # the logits are used in place (a view), not copied per valid position
            self.total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100,
                reduction="sum").double())
            self.predicted += int(valid.sum())

    def result(self) -> dict:
        if not self.predicted:
            return {"loss": None, "perplexity": None, "predicted_tokens": 0}
        loss = self.total / self.predicted
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "predicted_tokens": self.predicted}


class CompareSums:
    """MODEL against one reference on real positions: max abs logit difference (and where),
    mean KL(reference ‖ model), top-1 agreement, largest |reference logit|."""

    def __init__(self):
        self.positions = 0
        self.max_abs = 0.0
        self.where = None
        self.kl = 0.0
        self.agree = 0
        self.scale = 0.0

    def add(self, model_logits, reference_logits, batch, batch_index: int, row_offset: int = 0) -> None:
        if model_logits.shape != reference_logits.shape:
            raise SurgeryError(f"logits shapes differ: MODEL {list(model_logits.shape)}, reference {list(reference_logits.shape)}")
        real = batch.attention_mask.to(model_logits.device).bool()
        coordinates = real.nonzero()
        reference_logits = reference_logits.to(model_logits.device)
        if bool(real.all()):  # views, no copies
            model_real = model_logits.reshape(-1, model_logits.shape[-1])
            reference_real = reference_logits.reshape(-1, reference_logits.shape[-1])
        else:
            model_real, reference_real = model_logits[real], reference_logits[real]
        step = max(1, COMPARE_BLOCK // model_real.shape[-1])
        for start in range(0, model_real.shape[0], step):
            m = model_real[start:start + step].float()
            r = reference_real[start:start + step].float()
            diff = (m - r).abs()
            flat = int(diff.argmax())
            value = float(diff.reshape(-1)[flat])
            if value > self.max_abs or self.where is None or math.isnan(value):
                position = start + flat // m.shape[-1]
                row, column = (int(v) for v in coordinates[position])
                self.max_abs = value
                self.where = {"batch": batch_index, "row": row + row_offset, "position": column,
                              "token_id": flat % m.shape[-1]}
            log_m = torch.log_softmax(m, dim=-1)
            log_r = torch.log_softmax(r, dim=-1)
            self.kl += float((log_r.exp() * (log_r - log_m)).sum().double())
            self.agree += int((m.argmax(-1) == r.argmax(-1)).sum())
            self.scale = max(self.scale, float(r.abs().max()))
        self.positions += model_real.shape[0]

    def result(self) -> dict:
        return {"max_abs_diff": self.max_abs, "max_abs_diff_at": self.where,
                "mean_kl": self.kl / self.positions if self.positions else None,
                "top1_agreement": self.agree / self.positions if self.positions else None,
                "reference_logit_scale": self.scale, "positions": self.positions}
