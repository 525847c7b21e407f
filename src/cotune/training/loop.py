"""The local training step: AdamW, warmup + cosine schedule, gradient accumulation, clipping.

Kept deliberately plain (one forward/backward per micro-batch, nothing hidden) so its
throughput can be compared head to head with a minimal PyTorch + peft loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from cotune.config.schema import TrainConfig
from cotune.models.lora import piece_sizes


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(params), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def clip_gradients(params: Sequence[torch.Tensor], max_norm: float) -> None:
    """torch's `clip_grad_norm_`, with a flat parameter's gradient taken weight by weight (`piece_sizes`), in
    order: the same norm, to the bit, as clipping the adapter's weights as peft holds them."""
    grads: list[torch.Tensor] = []
    for param in params:
        if param.grad is not None:
            sizes = piece_sizes(param)
            grads.extend([param.grad] if sizes is None else param.grad.split(list(sizes)))
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


def cosine_with_warmup(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """lr multiplier: linear warmup, then cosine decay to min_lr_ratio (a one-cycle schedule)."""
    warmup = max(0, round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
    )


Batch = torch.Tensor | Mapping[str, torch.Tensor]


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token loss on a window of ids, or answer-only loss on a batch dict with labels."""
    if isinstance(batch, torch.Tensor):
        return model(input_ids=batch, labels=batch).loss
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss


def train_step(
    model: nn.Module,
    micro_batches: Sequence[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float | None,
) -> float:
    """One optimizer step over `micro_batches` (gradient accumulation); returns the mean loss."""
    model.train()
    total = 0.0
    for ids in micro_batches:
        loss = lm_loss(model, ids) / len(micro_batches)
        loss.backward()
        total += loss.item()
    optimizer_step(optimizer, scheduler, max_grad_norm)
    return total


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float | None,
) -> None:
    """Clip the accumulated gradients, step the optimizer and the schedule, clear the gradients."""
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        clip_gradients(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
