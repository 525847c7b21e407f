"""Language-modelling evaluation: token-level loss, perplexity and next-token accuracy.

What is scored is either token windows (every next token counts) or prompt + response examples
(`Examples`: the data layer's EncodedSet, right-padded rows whose labels are IGNORE_INDEX on the prompt
and the padding), where only the labelled tokens count: the perplexity of the responses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # a target that is not scored (torch's cross-entropy skips it too)


class Examples(Protocol):
    """Rows of prompt + response with labels (the data layer's EncodedSet)."""

    def __len__(self) -> int: ...

    def batch(self, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]: ...


LMData = torch.Tensor | Examples  # token windows (n, seq_len), or labelled examples


def lm_batch(
    data: LMData, b: int, batch_size: int, device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Batch `b`: the model's inputs and each position's next-token target (IGNORE_INDEX where none is
    scored), as `rows_batch` gives them for rows b * batch_size onwards."""
    rows = torch.arange(b * batch_size, min((b + 1) * batch_size, len(data)))
    return rows_batch(data, rows, device)


def rows_batch(
    data: LMData, rows: torch.Tensor, device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rows `rows` as one batch: the model's inputs and each position's next-token target. Windows: every
    next token; examples: their labels, with the attention mask of the padding."""
    if isinstance(data, torch.Tensor):
        ids = data[rows].to(device)
        return {"input_ids": ids}, ids[:, 1:]
    batch = data.batch(rows, device)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return inputs, batch["labels"][:, 1:]


@dataclass(frozen=True)
class LMEval:
    loss: float
    ppl: float
    acc: float
    tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return {"loss": self.loss, "ppl": self.ppl, "acc": self.acc, "tokens": self.tokens}


def batch_count(windows: LMData, batch_size: int, max_batches: int | None) -> int:
    n_batches = math.ceil(len(windows) / batch_size)
    return n_batches if max_batches is None else min(n_batches, max_batches)


class TokenStats:
    """Summed next-token loss, correct predictions and targets over batches; a target of IGNORE_INDEX
    (a prompt or padding position of an example) is not counted."""

    def __init__(self) -> None:
        self.loss_sum, self.correct, self.count = 0.0, 0, 0

    def add(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits = logits.float()
        self.loss_sum += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"
        ).item()
        scored = target != IGNORE_INDEX
        self.correct += int(((logits.argmax(-1) == target) & scored).sum().item())
        self.count += int(scored.sum().item())

    def result(self) -> LMEval:
        if self.count == 0:
            raise ValueError("nothing to evaluate: no validation windows")
        loss = self.loss_sum / self.count
        ppl = math.exp(min(loss, 700.0))
        return LMEval(loss=loss, ppl=ppl, acc=self.correct / self.count, tokens=self.count)


@torch.no_grad()
def evaluate_lm(model: nn.Module, windows: LMData, batch_size: int, max_batches: int | None = None) -> LMEval:
    """Mean over every predicted token (not over batches), so uneven batches weigh correctly; of
    examples, over their response tokens only."""
    model.eval()
    device = next(model.parameters()).device
    stats = TokenStats()
    for b in range(batch_count(windows, batch_size, max_batches)):
        inputs, target = lm_batch(windows, b, batch_size, device)
        stats.add(model(**inputs).logits[:, :-1], target)
    return stats.result()


@torch.no_grad()
def evaluate_lm_through(
    model: nn.Module,
    windows: LMData,
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
        inputs, target = lm_batch(windows, b, batch_size, device)
        rows = len(target)
        names = [name for name in adapter_names for _ in range(rows)]
        repeated = {key: x.repeat(len(adapter_names), 1) for key, x in inputs.items()}
        logits = model(**repeated, adapter_names=names).logits[:, :-1]
        for k, stat in enumerate(stats):
            stat.add(logits[k * rows : (k + 1) * rows], target)
    return [stat.result() for stat in stats]


@torch.no_grad()
def example_losses(model: nn.Module, data: LMData, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Each row's mean next-token loss (float64, on the CPU), over its scored tokens only: what a
    membership-inference attack reads per example (`evaluation.membership_inference`). A row with no
    scored token (an example whose response was cut off entirely) gets NaN, for the caller to leave out."""
    model.eval()
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(rows), batch_size):
        inputs, target = rows_batch(data, rows[start : start + batch_size], device)
        logits = model(**inputs).logits[:, :-1].float()
        token_loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (rows, positions)
        scored = target != IGNORE_INDEX
        total = (token_loss * scored).sum(1).double()
        count = scored.sum(1).double()
        out.append((total / count).cpu())  # 0 / 0: NaN
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
