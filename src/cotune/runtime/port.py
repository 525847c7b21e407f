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

from cotune.evaluation.generation import GenSample
from cotune.evaluation.lm import LMEval
from cotune.state import AdapterState

T = TypeVar("T")

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


# ---- what the clients answer: one frozen dataclass per kind of answer ------------------------------------
# In process a report passes as it is; on Flower it travels through the one codec of the wire module
# (`runtime.flower.protocol.encode` / `decode`), which carries every field, `extra` included, exactly.

# Metrics a client reports beyond a report's typed fields: JSON values (numbers, strings, booleans, lists
# and string-keyed mappings of them, nested), carried as they are on every transport.
Extra = Mapping[str, Any]


@dataclass(frozen=True)
class TrainReport:
    """How a client's local training of one round went."""

    loss: float  # mean loss of the round's steps
    last_loss: float  # the last step's loss (nan without a step)
    lr: float  # the learning rate after the round
    tokens_per_s: float
    steps: int
    wall_s: float
    extra: Extra = field(default_factory=dict)


@dataclass(frozen=True)
class GenScores:
    """What a client's adapter generated for its test prompts, judged against the references (means over
    `n` examples; `ppl` of the reference responses). Scores only: the generated text stays on the client,
    except `samples`, a few examples with their generations that a client sends only when its data is
    the shipped public data (`Decoding.samples`; never with data of its own)."""

    n: int
    exact_match: float
    f1: float
    rouge_l: float
    ppl: float
    samples: tuple[GenSample, ...] = ()


@dataclass(frozen=True)
class EvalReport:
    """A client's scores of the adapter it was sent: on its validation windows and, when it holds a test
    split, on that (which nothing but the reports reads: the trust never sees it). Generation data: the
    perplexities are of the response tokens, and `gen` scores the test examples' generations."""

    val: LMEval
    test: LMEval | None = None
    extra: Extra = field(default_factory=dict)
    gen: GenScores | None = None


@dataclass(frozen=True)
class PeerScores:
    """Client i's row of P (validation trust): each peer adapter's perplexity on its validation windows,
    in the order the peers were sent."""

    ppl: tuple[float, ...]


@dataclass(frozen=True)
class ClientInfo:
    """Who a client is (its answer to `describe`): what the server weighs and checks it by."""

    partition: int  # which client of the config it is
    device: str
    examples: int | None = None  # FedCoLLM family: n_k, its FedAvg weight as it claims it
    own_data: bool = False  # trains on its own files (a SuperNode's data-path): n_k cannot be checked
    train_windows: int | None = None  # personalized family: its token windows (generation: examples) by split
    val_windows: int | None = None
    test_windows: int | None = None
    label_names: tuple[str, ...] = ()  # its label mixture (the oracle's evidence, a report's client names)
    mixture: tuple[float, ...] = ()


@dataclass(frozen=True)
class Upload:
    """A client's answer to `train`: its adapter after local training, and how training went."""

    adapter: AdapterState
    report: TrainReport


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

    def describe(self) -> Replies[ClientInfo]:
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
    ) -> Replies[EvalReport]:
        """Client i evaluates adapters[i] on its own validation data (loss, ppl, acc, tokens) and, when it
        holds a test split, on that too. `on_done(i)` as each client's part is over, here and in
        `evaluate_peers` and `predict`."""
        ...

    def evaluate_peers(
        self,
        round_: int,
        adapters: Mapping[int, AdapterState],
        val_batches: int,
        on_done: OnDone | None = None,
    ) -> Replies[PeerScores]:
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
