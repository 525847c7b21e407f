"""Language-modelling evaluation: token-level loss, perplexity and next-token accuracy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LMEval:
    loss: float
    ppl: float
    acc: float
    tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return {"loss": self.loss, "ppl": self.ppl, "acc": self.acc, "tokens": self.tokens}


@torch.no_grad()
def evaluate_lm(
    model: nn.Module, windows: torch.Tensor, batch_size: int, max_batches: int | None = None
) -> LMEval:
    """Mean over every predicted token (not over batches), so uneven batches weigh correctly."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct, count = 0.0, 0, 0
    n_batches = math.ceil(len(windows) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        ids = windows[b * batch_size : (b + 1) * batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:]
        loss_sum += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"
        ).item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    if count == 0:
        raise ValueError("nothing to evaluate: no validation windows")
    loss = loss_sum / count
    return LMEval(loss=loss, ppl=math.exp(min(loss, 700.0)), acc=correct / count, tokens=count)
