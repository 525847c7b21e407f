"""Language-modelling evaluation: token-level loss, perplexity and next-token accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def batch_count(windows: torch.Tensor, batch_size: int, max_batches: int | None) -> int:
    n_batches = math.ceil(len(windows) / batch_size)
    return n_batches if max_batches is None else min(n_batches, max_batches)


class TokenStats:
    """Summed next-token loss, correct predictions and targets over batches."""

    def __init__(self) -> None:
        self.loss_sum, self.correct, self.count = 0.0, 0, 0

    def add(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits = logits.float()
        self.loss_sum += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"
        ).item()
        self.correct += int((logits.argmax(-1) == target).sum().item())
        self.count += target.numel()

    def result(self) -> LMEval:
        if self.count == 0:
            raise ValueError("nothing to evaluate: no validation windows")
        loss = self.loss_sum / self.count
        ppl = math.exp(min(loss, 700.0))
        return LMEval(loss=loss, ppl=ppl, acc=self.correct / self.count, tokens=self.count)


@torch.no_grad()
def evaluate_lm(
    model: nn.Module, windows: torch.Tensor, batch_size: int, max_batches: int | None = None
) -> LMEval:
    """Mean over every predicted token (not over batches), so uneven batches weigh correctly."""
    model.eval()
    device = next(model.parameters()).device
    stats = TokenStats()
    for b in range(batch_count(windows, batch_size, max_batches)):
        ids = windows[b * batch_size : (b + 1) * batch_size].to(device)
        stats.add(model(input_ids=ids).logits[:, :-1], ids[:, 1:])
    return stats.result()


@torch.no_grad()
def evaluate_lm_through(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    adapter_names: Sequence[str],
    max_batches: int | None = None,
) -> list[LMEval]:
    """`evaluate_lm` of the same windows through each named adapter of a peft model, every adapter in
    one forward per batch (peft's mixed-adapter batch: each row through its own adapter). The same
    figures as one `evaluate_lm` per adapter up to the float rounding of a larger batch. It pays where
    one forward of K x B rows costs less than K forwards of B rows (a GPU), not on a CPU."""
    model.eval()
    device = next(model.parameters()).device
    stats = [TokenStats() for _ in adapter_names]
    for b in range(batch_count(windows, batch_size, max_batches)):
        ids = windows[b * batch_size : (b + 1) * batch_size].to(device)
        rows = len(ids)
        names = [name for name in adapter_names for _ in range(rows)]
        logits = model(input_ids=ids.repeat(len(adapter_names), 1), adapter_names=names).logits[:, :-1]
        for k, stat in enumerate(stats):
            stat.add(logits[k * rows : (k + 1) * rows], ids[:, 1:])
    return [stat.result() for stat in stats]
