"""What a SuperNode (one data owner) does with each message of the ServerApp: the ClientApp's work.

Every handler rebuilds the node from the config the message carries plus the state it saved on its
own disk after its last trained round of this run (node_state.py: adapter, trainer state, RNG),
calls one `ClientWork` method, saves the state after training and replies. Flower turns an
exception into an error reply, which the server's transport reports as a failed client.

`node_app` runs in whichever process does the work: the ClientApp process Flower starts for the
message, a simulation actor, or a node worker (worker.py) that the ClientApp forwards to
(client_app.py). Message types (see protocol.py): `query.describe`, `train`, `evaluate`, and the
trust evidence actions `evaluate.peers` (validation trust) and `query.predict` (prediction trust).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from cotune.algorithms.compression import Compression, packed
from cotune.algorithms.ranks import flora_stack, rank_of, rank_slice
from cotune.runtime.flower import protocol as p
from cotune.runtime.flower import secagg
from cotune.runtime.flower.node import Node, NodeSettings, node_config

# SecAgg+ (federation.secure_aggregation): the protocol's messages pass through Flower's secaggplus_mod.
node_app = ClientApp(mods=[secagg.maybe_secaggplus])


def open_node(message: Message, context: Context) -> AbstractContextManager[tuple[p.Job, Node]]:
    """The node as it was after its last trained round of this run (fresh before its first)."""
    return open_job(p.job_of(message), context, message)


@contextmanager
def open_job(job: p.Job, context: Context, message: Message | None = None) -> Iterator[tuple[p.Job, Node]]:
    """The node for one message; its base model goes back, unwrapped (and unmerged), to the process's
    cache after."""
    started = time.perf_counter()
    settings = NodeSettings.from_node_config(context.node_config)
    node = Node(job.family, node_config(job.config_yaml, settings), settings)
    try:
        restore(node, job)
        if message is not None:
            merge_base(node, job, message)
        node.seed_if_new()
        ready = time.perf_counter()
        yield job, node
        print(
            f"cotune node {node.index}: ready in {ready - started:.2f} s (model, adapter, data, state), "
            f"work {time.perf_counter() - ready:.2f} s",
            file=sys.stderr,
            flush=True,
        )
    finally:
        node.close()


def merge_base(node: Node, job: p.Job, message: Message) -> None:
    """FLoRA: merge the server's history into this node's base. The node keeps the history it was sent
    on its own disk; a message brings only the components it does not hold yet (from `base_from`)."""
    if job.base is None or not job.base.rank:
        return
    rank, start = job.base.rank, job.base.start
    store = node.store(job.run_key)
    held = store.load_base()
    if start and (held is None or rank_of(held) < start):
        raise ValueError(
            f"this SuperNode lost the first {start} components of FLoRA's merged update (another state-dir, "
            "or a lost disk?); the server sends it the whole update with its next message"
        )
    parts = [rank_slice(held, 0, start)] if start and held is not None else []
    if p.BASE in message.content.array_records:
        parts.append(p.record_to_tensors(message.content.array_records[p.BASE]))
    update = flora_stack(parts)
    if rank_of(update) != rank:
        raise ValueError(f"FLoRA's merged update has rank {rank_of(update)} here, the server says {rank}")
    if start < rank:
        store.save_base(update)
    node.pool.set_base_update(update)


def restore(node: Node, job: p.Job) -> None:
    """This run's state from the node's own disk (node_state.py): the round the server names after a
    resume, else the latest it trained. Another run (another run key) never shares it."""
    if not job.run_key:
        return
    store = node.store(job.run_key)
    pinned = job.resume.get(node.index) if job.resume else None
    round_ = pinned if pinned is not None else store.latest()
    if round_ is not None:
        adapter, trainer = store.load(round_)
        node.work.adopt(adapter)
        node.load_trainer_state(trainer)


def save(node: Node, job: p.Job) -> None:
    """After training: the node's adapter and trainer state, for its next message or a resumed run."""
    node.store(job.run_key).save(job.round, node.work.adapter(), node.trainer_state())


def reply(message: Message, records: dict[str, ArrayRecord | ConfigRecord]) -> Message:
    return Message(RecordDict(dict(records)), reply_to=message)


def adopt_sent(node: Node, message: Message) -> None:
    if p.ADAPTER in message.content.array_records:
        node.adopt(p.adapter_of(message.content.array_records[p.ADAPTER], Compression.of(node.cfg)))


@node_app.query("describe")
def describe(message: Message, context: Context) -> Message:
    with open_node(message, context) as (_, node):
        return reply(message, {p.REPORT: p.encode(node.work.describe())})


@node_app.train()
def train(message: Message, context: Context) -> Message:
    if secagg.is_fit_message(message):
        return secure_train(message, context)
    with open_node(message, context) as (job, node):
        adopt_sent(node, message)
        report = node.work.train(job.steps)  # None (FedCoLLM): its own budget (local_epochs: its data)
        save(node, job)
        payload = node.work.payload  # with federation.compress, its round update as encoded
        if payload is not None:
            return reply(
                message, {p.UPDATE: p.tensors_to_record(packed(payload)), p.REPORT: p.encode(report)}
            )
        return reply(
            message, {p.ADAPTER: p.tensors_to_record(node.work.adapter()), p.REPORT: p.encode(report)}
        )


@node_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    with open_node(message, context) as (_, node):
        adopt_sent(node, message)
        return reply(message, {p.REPORT: p.encode(node.work.evaluate())})


@node_app.evaluate("peers")
def evaluate_peers(message: Message, context: Context) -> Message:
    with open_node(message, context) as (job, node):
        asked = job.peers
        if asked is None:
            raise ValueError("an evaluate.peers message without its peers")
        records = message.content.array_records
        spec = Compression.of(node.cfg)
        adapters = [p.adapter_of(records[f"{p.PEER_PREFIX}{j}"], spec) for j in asked.peers]
        row = node.work.peer_perplexity(adapters, asked.val_batches)
        return reply(message, {p.REPORT: p.encode(row)})


@node_app.query("predict")
def predict(message: Message, context: Context) -> Message:
    with open_node(message, context) as (job, node):
        adopt_sent(node, message)
        a = job.predict
        if a is None:
            raise ValueError("a query.predict message without its arguments")
        pred = node.work.predict(a.batches, a.batch_size, a.k, job.round)
        return reply(message, p.prediction_records(pred))


def secure_train(message: Message, context: Context) -> Message:
    """A SecAgg+ round's training (FedCoLLM family): the same work, the legacy fit format for the mod."""
    config, adapter = secagg.fit_request(message)
    with open_job(p.decode(ConfigRecord(config), p.Job), context) as (job, node):
        if node.family != "fedcollm":
            raise ValueError("secure aggregation is implemented for the FedCoLLM family's FedAvg step")
        node.adopt(adapter)
        report = node.work.train()
        save(node, job)
        weight = (job.weights or {}).get(node.index, node.weight())  # the server's checked n_k
        return secagg.fit_reply(message, node.work.adapter(), list(adapter), weight, dict(p.encode(report)))
