"""Several clients' local steps as one forward/backward over the shared base (federation.parallel_clients).

The clients' adapters are disjoint parameters of one peft model, so one backward of the SUM of the
clients' own mean losses gives each adapter exactly the gradient its client would compute alone;
each row of the mixed batch goes through its own client's adapter (peft's `adapter_names`). Each
client keeps its own optimizer, schedule, data cursor and clipping: only the forward/backward is
shared. peft routes mixed batches in eval mode only, so the step is exact only without dropout:
LoRA dropout is refused by the config, dropout in the base model here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from cotune.training.learner import Learner, StepLog
from cotune.training.loop import Batch, optimizer_step

IGNORE = -100  # label of positions that carry no loss (prompt, padding), as transformers uses it
OnLoss = Callable[[float], None] | None


class NotVectorizable(ValueError):
    """The model has dropout that a mixed-adapter batch (eval mode) would switch off."""


def check_no_dropout(model: torch.nn.Module) -> None:
    """Refuse a base model whose training forward differs from its eval forward (active dropout)."""
    active = sorted(
        {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0}
    )
    config = getattr(model, "config", None)
    rates = {k: getattr(config, k, 0.0) for k in ("attention_dropout", "hidden_dropout", "resid_pdrop")}
    if active or any(isinstance(v, float) and v > 0 for v in rates.values()):
        raise NotVectorizable(
            "federation.parallel_clients > 1 trains several clients in one eval-mode batch, which would "
            "switch off this model's dropout: set federation.parallel_clients: 1 (or lora.dropout: 0 and a "
            "base model without dropout)"
        )


def _as_dict(batch: Batch) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):  # language-model windows: every token is a target
        return {"input_ids": batch, "attention_mask": torch.ones_like(batch), "labels": batch}
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def mixed_batch(batches: Sequence[Batch]) -> tuple[dict[str, torch.Tensor], list[slice]]:
    """The clients' micro-batches stacked into one, right-padded to a common width (padding is masked
    and carries no label), and the rows of each client."""
    parts = [_as_dict(b) for b in batches]
    width = max(p["input_ids"].shape[1] for p in parts)
    fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE}
    out = {
        key: torch.cat([F.pad(p[key], (0, width - p[key].shape[1]), value=value) for p in parts])
        for key, value in fill.items()
    }
    rows, start = [], 0
    for p in parts:
        rows.append(slice(start, start + len(p["input_ids"])))
        start += len(p["input_ids"])
    return out, rows


def client_losses(logits: torch.Tensor, labels: torch.Tensor, rows: Sequence[slice]) -> list[torch.Tensor]:
    """Each client's mean next-token loss over its own rows, as transformers computes it for a batch
    of that client alone (shifted labels, ignored positions left out, fp32)."""
    out = []
    for r in rows:
        shifted = logits[r, :-1].float()
        target = labels[r, 1:]
        out.append(
            F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), ignore_index=IGNORE)
        )
    return out


def train_together(
    learners: Sequence[Learner], steps: Sequence[int], on_step: Sequence[OnLoss] | None = None
) -> list[StepLog]:
    """`steps[k]` optimizer steps of each learner, its micro-batches run together with the others'
    (a learner with fewer steps drops out of the later ones). All learners share one AdapterPool."""
    if not learners:
        return []
    pool = learners[0].pool
    if any(learner.pool is not pool for learner in learners):
        raise ValueError("learners trained together must share one adapter pool")
    check_no_dropout(pool.model)
    callbacks = list(on_step) if on_step is not None else [None] * len(learners)
    losses: list[list[float]] = [[] for _ in learners]
    tokens = [0] * len(learners)
    t0 = time.perf_counter()
    with pool.lanes_for([learner.slot for learner in learners], trainable=True) as lanes:
        for learner in learners:
            for param in learner.frozen_params:
                param.requires_grad_(False)
        for s in range(max(steps)):
            active = [k for k in range(len(learners)) if steps[k] > s]
            drawn = {k: learners[k].next_batches() for k in active}
            for k in active:
                tokens[k] += drawn[k][1]
            totals = _step(pool.model, [lanes[k] for k in active], [drawn[k][0] for k in active])
            for k, total in zip(active, totals, strict=True):
                learner = learners[k]
                optimizer_step(learner.optimizer, learner.scheduler, learner.cfg.max_grad_norm)
                losses[k].append(total)
                callback = callbacks[k]
                if callback is not None:
                    callback(total)
    seconds = time.perf_counter() - t0
    return [StepLog(losses[k], tokens[k], seconds) for k in range(len(learners))]


def _step(model: torch.nn.Module, lanes: Sequence[str], micro: Sequence[Sequence[Batch]]) -> list[float]:
    """Forward/backward of every micro-batch index over all clients at once (each in its peft adapter,
    `lanes`); each client's mean loss."""
    n_micro = len(micro[0])
    if any(len(m) != n_micro for m in micro):
        raise ValueError("clients trained together must use the same gradient accumulation")
    totals = [0.0] * len(lanes)
    model.eval()  # peft routes mixed batches only in eval mode; check_no_dropout made it the same
    for m in range(n_micro):
        batch, rows = mixed_batch([client[m] for client in micro])
        names = [lane for lane, r in zip(lanes, rows, strict=True) for _ in range(r.stop - r.start)]
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=names
        ).logits
        losses = client_losses(logits, batch["labels"], rows)
        (torch.stack(losses).sum() / n_micro).backward()
        for k, loss in enumerate(losses):
            totals[k] += loss.item() / n_micro
    return totals
