"""One adapter under training: its slot in an AdapterPool, its AdamW + schedule, and its data cursor.

Every adapter cotune trains is a Learner: a personalized client's LoRA, a FedCoLLM client's SLM
adapter, and the FedCoLLM server's two (theta on D_a, the LLM's omega). One class, so the local
step of every method and every transport is the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cotune.config.schema import TrainConfig
from cotune.data.task_data import EncodedSet
from cotune.data.windows import WindowSampler
from cotune.models.lora import AdapterPool
from cotune.training.loop import Batch, make_optimizer, make_scheduler, train_step
from cotune.training.rng import RandomStream

# Token windows (language modelling, n x seq_len) or prompt/answer examples (answer-only loss).
TrainData = torch.Tensor | EncodedSet


def micro_batches(
    data: TrainData, indices: torch.Tensor, batch_size: int, device: torch.device | str
) -> tuple[list[Batch], int]:
    """The rows `indices` of `data` on `device`, split into micro-batches; and the tokens they hold."""
    if isinstance(data, torch.Tensor):
        ids = data[indices].to(device)
        return list(ids.split(batch_size)), ids.numel()
    parts = [data.batch(part, torch.device(device)) for part in indices.split(batch_size)]
    return list(parts), sum(int(b["attention_mask"].sum()) for b in parts)


def one_parameter_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state as a learner's (one flat parameter): states saved when each LoRA weight was a
    parameter of its own (cotune before flat weights) have their moments joined back to back, in the
    parameters' order, which is the order the flat parameter holds the weights in."""
    groups = state["param_groups"]
    if len(groups) == 1 and len(groups[0]["params"]) == 1:
        return state
    indices = [i for group in groups for i in group["params"]]
    moments = state["state"]
    if moments and sorted(moments) != sorted(indices):
        raise ValueError(
            "this optimizer state has moments for only some of its parameters; it cannot be joined"
        )
    joined = {}
    if moments:
        first = moments[indices[0]]
        joined = {
            0: {
                key: first[key]
                if key == "step"
                else torch.cat([moments[i][key].reshape(-1) for i in indices])
                for key in first
            }
        }
    return {"state": joined, "param_groups": [{**groups[0], "params": [0]}]}


@dataclass(frozen=True)
class StepLog:
    """What `Learner.train` did: one loss per optimizer step, tokens seen, seconds taken."""

    losses: list[float]
    tokens: int
    seconds: float

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / max(1, len(self.losses))


class Learner:
    """An adapter slot with its optimizer, schedule, data cursor (a WindowSampler) and its own random
    stream for dropout (`rng`, seeded with `seed`): what it draws never depends on what else ran."""

    def __init__(
        self,
        pool: AdapterPool,
        slot: str,
        data: TrainData,
        train: TrainConfig,
        total_steps: int,
        seed: int,
        device: torch.device | str,
        accumulate: bool = True,
        frozen: Sequence[str] = (),
    ) -> None:
        self.pool, self.slot, self.data, self.cfg, self.device = pool, slot, data, train, device
        # `frozen`: weight-name parts this learner never trains (FFA-LoRA: "lora_A"): no optimizer
        # state, and no gradient either (switched off after each activation, which turns them back on)
        trained, self.frozen_params = pool.split_parameters(slot, frozen)
        self.optimizer = make_optimizer([trained], train)
        self.scheduler = make_scheduler(self.optimizer, max(1, total_steps), train)
        per_step = train.batch_size * (train.grad_accum if accumulate else 1)
        self.sampler = WindowSampler(len(data), per_step, seed)
        self.rng = RandomStream(seed, device)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def reset_optimizer(self) -> None:
        """Forget AdamW's moments (and step counts); the schedule goes on where it was."""
        self.optimizer.state.clear()

    def next_batches(self) -> tuple[list[Batch], int]:
        """The micro-batches of the next optimizer step (and their tokens), from the data cursor."""
        return micro_batches(self.data, self.sampler.next_indices(), self.cfg.batch_size, self.device)

    def train(self, steps: int, on_step: Callable[[float], None] | None = None) -> StepLog:
        """`steps` optimizer steps of this adapter on its own data."""
        self.pool.activate(self.slot)
        for param in self.frozen_params:
            param.requires_grad_(False)
        losses: list[float] = []
        tokens, t0 = 0, time.perf_counter()
        for _ in range(steps):
            batches, n = self.next_batches()
            with self.rng.active():
                loss = train_step(
                    self.pool.model, batches, self.optimizer, self.scheduler, self.cfg.max_grad_norm
                )
            losses.append(loss)
            tokens += n
            if on_step is not None:
                on_step(losses[-1])
        return StepLog(losses, tokens, time.perf_counter() - t0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "random_stream": self.rng.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(one_parameter_state(state["optimizer"]))
        for param in self.optimizer.param_groups[0]["params"]:
            moments = self.optimizer.state.get(param)
            if moments and moments["exp_avg"].shape != param.shape:
                raise ValueError("this optimizer state was saved for an adapter of another size")
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if "random_stream" in state:  # trainer states saved before learners had their own stream lack it
            self.rng.load_state_dict(state["random_stream"])
