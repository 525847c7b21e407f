"""The clients port: what a round loop asks of its clients, whatever carries the messages.

The loops of both families (`runtime.personalized`, `runtime.fedcollm`) are written once against
`Clients`; its implementations only move state and messages: `runtime.inprocess.InProcessClients`
(simulated clients around one shared base model) and `runtime.flower.clients.FlowerClients`
(one message per SuperNode). The loop owns every adapter it sends; a client answers with what it
computed, or fails (raised, timed out, disconnected) and is named in `Replies.failed`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch

from cotune.state import AdapterState

T = TypeVar("T")
TEST_PREFIX = "test_"  # an evaluate reply's test-split metrics, beside the validation ones

# Per public batch, the top-k logits of one client: (values, indices), each (batch, seq, k).
TopK = list[tuple[torch.Tensor, torch.Tensor]]
OnStep = Callable[[int, float], None]  # (client, loss) after each local optimizer step
# (client) once a client's part of an exchange is over (answered or failed): the unit of progress of
# evaluation and trust evidence, the one every transport can count (on Flower, a reply arriving)
OnDone = Callable[[int], None]


@dataclass
class Replies(Generic[T]):
    """The answers of one exchange by client index, and why the others gave none."""

    ok: dict[int, T] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Upload:
    """A client's answer to `train`: its adapter after local training, and how training went."""

    adapter: AdapterState
    metrics: Mapping[str, float]


@dataclass
class TrainReplies(Replies[Upload]):
    """`train`'s answers; `mean` is set when the transport aggregated securely (SecAgg+) instead."""

    mean: AdapterState | None = None


@dataclass(frozen=True)
class Prediction:
    """A client's top-k logits on the shared public batches, the vocabulary size, and a set digest."""

    topk: TopK
    vocab: int
    public_hash: str


class Clients(Protocol):
    """The operations the round loops need; see InProcessClients and FlowerClients."""

    @property
    def n(self) -> int: ...

    def describe(self) -> Replies[dict[str, Any]]:
        """Who takes part: each client's description (examples, windows, label mixture)."""
        ...

    def train(
        self,
        round_: int,
        adapters: Mapping[int, AdapterState],
        steps: int | None,
        on_step: OnStep | None = None,
        secure_weights: Mapping[int, float] | None = None,
    ) -> TrainReplies:
        """Client i adopts adapters[i] and trains `steps` local steps (None: its own round budget).

        An upload stays valid until the next exchange with that client (in process it is the client's
        slot itself, not a copy); a loop that keeps one longer keeps a copy.

        `secure_weights`, where the transport supports secure aggregation, asks for the weighted mean
        of the uploads instead of the uploads themselves (`TrainReplies.mean`).
        """
        ...

    def evaluate(
        self, round_: int, adapters: Mapping[int, AdapterState], on_done: OnDone | None = None
    ) -> Replies[dict[str, float]]:
        """Client i evaluates adapters[i] on its own validation data (loss, ppl, acc, tokens) and, when it
        holds a test split, on that too (the same keys prefixed TEST_PREFIX). `on_done(i)` as each
        client's part is over, here and in `evaluate_peers` and `predict`."""
        ...

    def evaluate_peers(
        self,
        round_: int,
        adapters: Mapping[int, AdapterState],
        val_batches: int,
        on_done: OnDone | None = None,
    ) -> Replies[list[float]]:
        """Client i's row of P: the perplexity of every given adapter (in key order) on its data."""
        ...

    def predict(
        self,
        round_: int,
        adapters: Mapping[int, AdapterState],
        batches: int,
        batch_size: int,
        k: int,
        on_done: OnDone | None = None,
    ) -> Replies[Prediction]:
        """Client i's top-k logits with adapters[i] on the shared public reference set."""
        ...

    def set_base(self, update: AdapterState | None) -> None:
        """From now on every client's base weights are the original ones plus `update` merged in (FLoRA's
        global history; None: the original ones). Each client sees it from its next message on."""
        ...

    def state_dict(self) -> Any:
        """What a checkpoint keeps of the transport: in process, every client's trainer state; on
        Flower, the run key and each client's last trained round (the states stay on the nodes)."""
        ...

    def load_state_dict(self, state: Any) -> None:
        """Continue from a checkpoint's `state_dict()` (a resumed run)."""
        ...
