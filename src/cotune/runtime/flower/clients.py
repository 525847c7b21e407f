"""The Flower transport: the clients port as messages to SuperNodes through a ServerApp's Grid.

It only moves state and messages: it finds the SuperNodes and which client (partition-id) each one
is, sends one message per client and waits with a timeout, and reports a client that errs or stays
silent as failed (the round loop drops it from that round and asks it again in the next). Every
computation happens in the loops (ServerApp) or in `ClientWork` (the ClientApp).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from cotune.algorithms.compression import Compression, applied, unpacked
from cotune.algorithms.ranks import rank_of, rank_slice
from cotune.config.loader import dump_config
from cotune.config.schema import ExperimentConfig
from cotune.runtime.flower import protocol as p
from cotune.runtime.flower import secagg
from cotune.runtime.port import (
    ClientInfo,
    EvalReport,
    OnDone,
    OnStep,
    PeerScores,
    Prediction,
    Replies,
    TrainReplies,
    TrainReport,
    Upload,
)
from cotune.runtime.rundir import config_fingerprint
from cotune.state import AdapterState

R = TypeVar("R")
DEFAULT_ROUND_TIMEOUT = 600.0  # seconds per exchange when federation.client_timeout is not set
# How often the server asks the SuperLink for replies. Flower's Grid.send_and_receive sleeps 3 s between
# asks, which every exchange pays (1.5 s on average); the ServerApp runs beside the SuperLink, so the
# ask is a local call.
DEFAULT_POLL_INTERVAL = 0.2


@dataclass(frozen=True)
class ServerSettings:
    """How long the server waits: for one exchange (federation.client_timeout) and for the nodes."""

    round_timeout: float = DEFAULT_ROUND_TIMEOUT
    connect_timeout: float = 120.0
    poll_interval: float = DEFAULT_POLL_INTERVAL

    @classmethod
    def from_config(
        cls, cfg: ExperimentConfig, run_config: Mapping[str, Any] | None = None
    ) -> ServerSettings:
        return cls(
            round_timeout=float(cfg.federation.client_timeout or DEFAULT_ROUND_TIMEOUT),
            connect_timeout=float((run_config or {}).get("connect-timeout", 120.0) or 120.0),
        )


class FlowerClients:
    """The clients port over a Flower Grid: one message per SuperNode and exchange."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        grid: Grid,
        family: str,
        settings: ServerSettings | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg, self.grid, self.family = cfg, grid, family
        self.compression = Compression.of(cfg)  # how adapters travel (federation.compress)
        self.settings = settings or ServerSettings.from_config(cfg)
        self.say = say or (lambda text: print(text, flush=True))
        self.config_yaml = dump_config(cfg)
        self.fingerprint = config_fingerprint(cfg)
        self.nodes: dict[int, int] = {}  # client index -> SuperNode id
        self.run_key = uuid.uuid4().hex  # where the nodes keep their trainer states for this run
        self.trained: dict[int, int] = {}  # client -> the last round it trained (answered)
        self.resume: dict[int, int] | None = None  # after a resume: what each node reloads
        self.base: AdapterState | None = None  # FLoRA: the update merged into every node's base
        self.base_held: dict[int, int] = {}  # client -> components of `base` its node confirmed it holds

    @property
    def n(self) -> int:
        return self.cfg.federation.clients

    def job(self, round_: int) -> p.Job:
        """The header of this round's messages; an action adds its arguments (`dataclasses.replace`)."""
        return p.Job(self.family, self.config_yaml, self.fingerprint, round_, self.run_key, self.resume)

    def body(self, client: int, job: p.Job, records: Mapping[str, Any] | None = None) -> RecordDict:
        """A message to `client`: the job, `records`, and what it lacks of the merged base update (FLoRA)."""
        if self.base is None:
            return p.content(job, records)
        rank, start = rank_of(self.base), self.base_held.get(client, 0)
        job = replace(job, base=p.BaseRange(rank, start))
        missing = {p.BASE: p.tensors_to_record(rank_slice(self.base, start, rank))} if start < rank else {}
        return p.content(job, {**(records or {}), **missing})

    def set_base(self, update: AdapterState | None) -> None:
        """Every later message tells its node the merged update's rank and brings the part it lacks."""
        self.base = update
        if update is None:
            self.base_held.clear()

    # ---- exchanges --------------------------------------------------------------------------------------
    def send_and_receive(
        self, messages: list[Message], on_reply: Callable[[Message], None] | None = None
    ) -> list[Message]:
        """Flower's Grid.send_and_receive, asking for replies every `poll_interval` instead of every 3 s:
        the replies that came within `round_timeout`, each given to `on_reply` as it arrives."""
        pending = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + self.settings.round_timeout
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies += got
            if on_reply is not None:
                for reply in got:
                    on_reply(reply)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self.settings.poll_interval)
        return replies

    def exchange(
        self,
        round_: int,
        message_type: str,
        bodies: Mapping[int, RecordDict],
        on_done: OnDone | None = None,
    ) -> Replies[RecordDict]:
        """One message per client; replies by client, and why the others gave none. `on_done(i)` as
        client i's reply (an answer or an error) arrives."""
        messages = {
            i: Message(body, dst_node_id=self.nodes[i], message_type=message_type, group_id=str(round_))
            for i, body in bodies.items()
        }
        # By the message replied to, not the sender: the SuperLink itself answers for an unavailable node.
        # (Message ids are given as the messages are pushed.)
        by_id: dict[str, int] = {}
        heard: set[int] = set()

        def arrived(reply: Message) -> None:
            if not by_id:
                by_id.update({m.metadata.message_id: i for i, m in messages.items()})
            i = by_id.get(reply.metadata.reply_to_message_id)
            if on_done is not None and i is not None and i not in heard:
                heard.add(i)
                on_done(i)

        replies = self.send_and_receive(list(messages.values()), arrived)
        if not by_id:
            by_id.update({m.metadata.message_id: i for i, m in messages.items()})
        out: Replies[RecordDict] = Replies()
        for reply in replies:
            i = by_id.get(reply.metadata.reply_to_message_id)
            if i is None or i in out.ok or i in out.failed:
                continue
            if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                out.failed[i] = (
                    f"SuperNode {self.nodes[i]} is unavailable (the SuperLink lost it: stopped, or its "
                    "connection dropped)"
                )
            elif reply.has_error():
                out.failed[i] = (
                    f"SuperNode {self.nodes[i]}: error reply (code {reply.error.code}): {reply.error.reason}"
                )
            else:
                out.ok[i] = reply.content
        for i in bodies:
            if i not in out.ok and i not in out.failed:
                wait = self.settings.round_timeout
                out.failed[i] = f"SuperNode {self.nodes[i]}: no reply within {wait:g}s (disconnected?)"
        if self.base is not None:  # a node that answered holds the whole update; one that failed gets it all
            self.base_held.update({i: rank_of(self.base) for i in out.ok})
            for i in out.failed:
                self.base_held.pop(i, None)
        return out

    def describe(self) -> Replies[ClientInfo]:
        """Wait for the SuperNodes, ask each which client (partition-id) it is, map clients to nodes."""
        deadline = time.monotonic() + self.settings.connect_timeout
        node_ids = list(self.grid.get_node_ids())
        while len(node_ids) < self.n and time.monotonic() < deadline:
            time.sleep(1.0)
            node_ids = list(self.grid.get_node_ids())
        self.say(f"{len(node_ids)} SuperNode(s) connected; asking which client each one is")
        messages = [Message(p.content(self.job(0)), dst_node_id=n, message_type=p.DESCRIBE) for n in node_ids]
        replies = self.send_and_receive(messages)
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        out: Replies[ClientInfo] = Replies()
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id)
            if node is None:
                continue
            try:
                if reply.has_error():
                    raise ValueError(reply.error.reason)
                info = report(reply.content, ClientInfo)
            except ValueError as e:
                self.say(f"WARNING SuperNode {node} could not join: {e}")
                continue
            i = info.partition
            if i in self.nodes:
                raise ValueError(f"SuperNodes {self.nodes[i]} and {node} both have partition-id {i}")
            self.nodes[i], out.ok[i] = node, info
        for i in range(self.n):
            if i not in self.nodes:
                out.failed[i] = (
                    f"no SuperNode with partition-id {i} joined within {self.settings.connect_timeout:g}s "
                    "(not started, not registered with the SuperLink, or without its CA certificate?)"
                )
        for i in sorted(out.ok):
            inf = out.ok[i]
            holds = (
                f"{inf.examples} examples"
                if inf.examples is not None
                else f"{inf.train_windows} train / {inf.val_windows} val windows"
            )
            self.say(f"  client {i}: SuperNode {self.nodes[i]}, {holds}")
        return out

    def train(
        self,
        round_: int,
        adapters: Mapping[int, AdapterState],
        steps: int | None,
        on_step: OnStep | None = None,
        secure_weights: Mapping[int, float] | None = None,
    ) -> TrainReplies:
        if secure_weights is not None:
            return self.secure_train(round_, adapters, secure_weights)
        job = replace(self.job(round_), steps=steps)
        bodies = {
            i: self.body(i, job, {p.ADAPTER: p.adapter_record(a, self.compression)})
            for i, a in adapters.items()
        }
        device = next(iter(next(iter(adapters.values())).values())).device  # the loop's adapters' device
        got = decoded_each(
            self.exchange(round_, p.TRAIN, bodies),
            lambda i, body: upload(body, device, adapters[i], self.compression),
        )
        for i in got.ok:
            self.note_trained(i, round_)
        return TrainReplies(got.ok, got.failed)

    def secure_train(
        self, round_: int, adapters: Mapping[int, AdapterState], weights: Mapping[int, float]
    ) -> TrainReplies:
        """Local training and the FedAvg mean as one SecAgg+ round: the server learns only the mean."""
        clients = sorted(adapters)
        payload = adapters[clients[0]]  # theta, the same for every client
        client_of = {self.nodes[i]: i for i in clients}
        record = p.encode(replace(self.job(round_), weights={i: int(weights[i]) for i in clients}))
        result = secagg.secure_average(
            self.grid,
            [self.nodes[i] for i in clients],
            {k: record[k] for k in record},
            payload,
            round_=round_,
            max_weight=float(max(weights.values())),
            min_nodes=1,
            timeout=self.settings.round_timeout,
        )
        out = TrainReplies(mean=result.average)
        for node, m in result.metrics.items():
            if node in client_of and result.average is not None:
                # The individual uploads are never seen; comm accounting counts the same-sized masked vectors.
                try:
                    trained = p.decode(ConfigRecord(m), TrainReport)
                except ValueError as e:
                    out.failed[client_of[node]] = f"unreadable reply: {e}"
                    continue
                out.ok[client_of[node]] = Upload(payload, trained)
                self.note_trained(client_of[node], round_)
        for i in clients:
            if i not in out.ok and i not in out.failed:
                out.failed[i] = "did not complete the SecAgg+ round"
        return out

    def evaluate(
        self, round_: int, adapters: Mapping[int, AdapterState], on_done: OnDone | None = None
    ) -> Replies[EvalReport]:
        job = self.job(round_)
        bodies = {
            i: self.body(i, job, {p.ADAPTER: p.adapter_record(a, self.compression)})
            for i, a in adapters.items()
        }
        got = self.exchange(round_, p.EVALUATE, bodies, on_done)
        return decoded(got, lambda body: report(body, EvalReport))

    def evaluate_peers(
        self,
        round_: int,
        adapters: Mapping[int, AdapterState],
        val_batches: int,
        on_done: OnDone | None = None,
    ) -> Replies[PeerScores]:
        peers = {f"{p.PEER_PREFIX}{j}": p.adapter_record(a, self.compression) for j, a in adapters.items()}
        job = replace(self.job(round_), peers=p.PeerArgs(tuple(adapters), val_batches))
        bodies = {i: self.body(i, job, peers) for i in adapters}
        got = self.exchange(round_, p.EVALUATE_PEERS, bodies, on_done)
        return decoded(got, lambda body: report(body, PeerScores))

    def predict(
        self,
        round_: int,
        adapters: Mapping[int, AdapterState],
        batches: int,
        batch_size: int,
        k: int,
        on_done: OnDone | None = None,
    ) -> Replies[Prediction]:
        """A node predicts with the adapter it holds, which is the one the loop holds for it."""
        job = replace(self.job(round_), predict=p.PredictArgs(batches, batch_size, k))
        bodies = {
            i: self.body(i, job, {p.ADAPTER: p.adapter_record(a, self.compression)})
            for i, a in adapters.items()
        }
        return decoded(self.exchange(round_, p.PREDICT, bodies, on_done), p.prediction_of)

    def note_trained(self, client: int, round_: int) -> None:
        """From now on the node continues from its latest state (no longer the resumed round's)."""
        self.trained[client] = round_
        if self.resume:
            self.resume.pop(client, None)

    def state_dict(self) -> dict[str, Any]:
        """What the server checkpoints: the run key and each client's last trained round. The trainer
        states themselves stay on the SuperNodes (see node_state.py for where and why)."""
        return {"run_key": self.run_key, "trained": dict(self.trained)}

    def load_state_dict(self, state: Any) -> None:
        if not state or "run_key" not in state:
            raise ValueError(
                "this Flower run's checkpoint predates resumable Flower runs (no run key): start a new run"
            )
        self.run_key = str(state["run_key"])
        self.trained = {int(k): int(v) for k, v in state["trained"].items()}
        self.resume = dict(self.trained)
        self.base_held.clear()  # what the nodes hold is not known after a resume: each gets it all again


def report(body: RecordDict, kind: type[R]) -> R:
    """The typed payload of a reply (`protocol.decode`)."""
    if p.REPORT not in body.config_records:
        raise ValueError(f"a reply without its {kind.__name__} (a node of another cotune version?)")
    return p.decode(body.config_records[p.REPORT], kind)


def upload(body: RecordDict, device: torch.device, sent: AdapterState, spec: Compression) -> Upload:
    """A train reply: the trained adapter (moved to `device`) and its report. With federation.compress
    the node sends its encoded update instead, and the upload is the adapter it was `sent` plus that
    update decoded (the sum the node computed too)."""
    if spec.off:
        state = {k: v.to(device) for k, v in p.record_to_tensors(body.array_records[p.ADAPTER]).items()}
    else:
        if p.UPDATE not in body.array_records:
            raise ValueError(
                "a train reply without its compressed update (a node of another cotune version?)"
            )
        reference = {k: v.to(device) for k, v in sent.items()}
        state = applied(
            reference, unpacked(p.record_to_tensors(body.array_records[p.UPDATE]), reference, spec)
        )
    return Upload(state, report(body, TrainReport))


def decoded(got: Replies[RecordDict], decode: Callable[[RecordDict], R]) -> Replies[R]:
    """Each reply's payload; a reply that does not decode makes its client a failed one (named why)."""
    return decoded_each(got, lambda i, body: decode(body))


def decoded_each(got: Replies[RecordDict], decode: Callable[[int, RecordDict], R]) -> Replies[R]:
    """`decoded`, with each reply's client index given to `decode`."""
    out: Replies[R] = Replies(failed=dict(got.failed))
    for i, body in got.ok.items():
        try:
            out.ok[i] = decode(i, body)
        except (ValueError, KeyError) as e:
            out.failed[i] = f"unreadable reply: {e}"
    return out
