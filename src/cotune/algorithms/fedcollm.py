"""FedCoLLM (SPEC A): what each algorithm of the family does in a round, and its pure parts.

The family shares one round skeleton (broadcast, local training, aggregation, server-side
mutual distillation, evaluation); each algorithm switches steps on or off, so the baselines
run through exactly the same code as FedCoLLM itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from cotune.algorithms.robust import robust_average
from cotune.config.names import Aggregator, FedCoLLMAlgorithm, Weighting
from cotune.state import AdapterState


@dataclass(frozen=True)
class RoundPlan:
    broadcast: bool  # server sends the SLM adapter to every client before local training
    local_training: bool  # clients train their SLM adapter on private data
    aggregate: bool  # server averages the uploaded SLM adapters
    distill: bool  # server runs mutual distillation SLM <-> LLM on the public set
    central_llm: bool  # the LLM adapter trains directly on all data (the centralized upper bound)
    trains: bool = True
    # the server's SLM steps on D_a without the LLM (cross-entropy only, lambda = 0): the fedavg_ft control
    fine_tune: bool = False

    @property
    def uses_llm(self) -> bool:
        return self.distill or self.central_llm

    @property
    def server_steps(self) -> bool:
        """Whether the server trains theta on D_a after the average (with the LLM teaching, or not)."""
        return self.distill or self.fine_tune


PLANS: dict[FedCoLLMAlgorithm, RoundPlan] = {  # one per name in config.names.FEDCOLLM_ALGORITHMS
    "fedcollm": RoundPlan(
        broadcast=True, local_training=True, aggregate=True, distill=True, central_llm=False
    ),
    "fedavg": RoundPlan(
        broadcast=True, local_training=True, aggregate=True, distill=False, central_llm=False
    ),
    "fedavg_ft": RoundPlan(
        broadcast=True, local_training=True, aggregate=True, distill=False, central_llm=False, fine_tune=True
    ),
    "standalone": RoundPlan(
        broadcast=False, local_training=True, aggregate=False, distill=False, central_llm=False
    ),
    "centralized": RoundPlan(
        broadcast=False, local_training=False, aggregate=False, distill=False, central_llm=True
    ),
    "zero_shot": RoundPlan(
        broadcast=False, local_training=False, aggregate=False, distill=False, central_llm=False, trains=False
    ),
}


def plan_of(algorithm: str) -> RoundPlan:
    """The round plan of a FedCoLLM-family algorithm (KeyError for a name of the other family)."""
    return PLANS[cast(FedCoLLMAlgorithm, algorithm)]


def fedavg_weights(n_examples: Sequence[int], weighting: Weighting = "examples") -> list[float]:
    """The FedAvg weights: n_k, or 1 for every client."""
    return list(map(float, n_examples)) if weighting == "examples" else [1.0] * len(n_examples)


def aggregate_slm(
    updates: Sequence[Mapping[str, torch.Tensor]],
    n_examples: Sequence[int],
    weighting: Weighting = "examples",
    aggregator: Aggregator = "mean",
    trim_fraction: float = 0.1,
) -> AdapterState:
    """theta^{t,0} = sum_k n_k theta_k / sum_k n_k (or the uniform mean), element-wise on A and B.

    `aggregator` median / trimmed_mean replace the mean (robust FedAvg; they ignore the weights).
    """
    if len(updates) != len(n_examples):
        raise ValueError(f"{len(updates)} updates but {len(n_examples)} example counts")
    weights = list(map(float, n_examples)) if weighting == "examples" else None
    return robust_average(updates, aggregator, trim_fraction, weights)


def check_payload(payload: Mapping[str, torch.Tensor], slm_shapes: Mapping[str, torch.Size]) -> None:
    """Only the SLM adapter travels: refuse anything else (above all the server's LLM LoRA).

    Keys alone cannot tell the two apart when LLM and SLM share an architecture family (peft
    names the modules identically), so the tensor shapes must match the SLM adapter's too.
    """
    extra = sorted(set(payload) - set(slm_shapes))
    missing = sorted(set(slm_shapes) - set(payload))
    if extra or missing:
        raise ValueError(
            f"payload is not exactly the SLM adapter: extra keys {extra[:3]}, missing {missing[:3]}"
        )
    wrong = [k for k, t in payload.items() if t.shape != slm_shapes[k]]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"payload is not exactly the SLM adapter: {k} has shape {tuple(payload[k].shape)}, "
            f"the SLM adapter's is {tuple(slm_shapes[k])}"
        )


def local_steps(
    local_epochs: int | None, steps: int, n_examples: int, batch_size: int, grad_accum: int
) -> int:
    """A client's optimizer steps per round: `steps`, or `local_epochs` passes over its n_k examples."""
    if local_epochs is None:
        return steps
    return local_epochs * math.ceil(n_examples / (batch_size * grad_accum))


def distill_batches(n_public: int, batch_size: int, max_steps: int | None) -> int:
    """Distillation batches per pass over D_a (one optimizer step each, no accumulation)."""
    n = math.ceil(n_public / batch_size)
    return min(n, max_steps) if max_steps else n
