"""The cotune ClientApp: what a SuperNode (one data owner) does with each message of the ServerApp.

Every handler rebuilds the node from the config the message carries plus the node's `Context.state`
(its adapter, optimizer, schedule, data cursor and RNG from earlier rounds of this run), does one
piece of work with the family's node (`PersonalizedNode` or `FedCoLLMNode`), saves the state back
and replies. Flower turns an exception into an error reply, which the server reports as a failed client.

Message types (see protocol.py): `query.describe`, `train`, `evaluate`, and the trust evidence
actions `evaluate.peers` (validation trust) and `query.predict` (prediction trust).
"""

from __future__ import annotations

import json
import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from cotune.runtime.flower import protocol as p
from cotune.runtime.flower import secagg
from cotune.runtime.flower.node import FedCoLLMNode, NodeSettings, PersonalizedNode, node_config

log = logging.getLogger("cotune.flower")

# SecAgg+ (federation.secure_aggregation): the protocol's messages pass through Flower's secaggplus_mod.
app = ClientApp(mods=[secagg.maybe_secaggplus])

Node = PersonalizedNode | FedCoLLMNode

# The algorithm family a message's job names -> what a data owner holds and does for it.
FAMILIES: dict[str, type[PersonalizedNode] | type[FedCoLLMNode]] = {
    "personalized": PersonalizedNode,
    "fedcollm": FedCoLLMNode,
}


def open_node(message: Message, context: Context) -> tuple[p.Job, Node]:
    """The node as it was after the previous message of this run (fresh on the first one)."""
    return open_job(p.job_of(message), context)


def open_job(job: p.Job, context: Context) -> tuple[p.Job, Node]:
    if job.family not in FAMILIES:
        raise ValueError(f"this cotune ClientApp does not implement the {job.family!r} family")
    settings = NodeSettings.from_node_config(context.node_config)
    node = FAMILIES[job.family](node_config(job.config_yaml, settings), settings)
    restore(node, context, job)
    return job, node


def restore(node: Node, context: Context, job: p.Job) -> None:
    state = context.state
    meta = state.config_records.get(p.STATE_META)
    if meta is None:
        return
    if meta["fingerprint"] != job.fingerprint or int(meta["run_id"]) != int(context.run_id):  # type: ignore[arg-type]
        # Another experiment (or run) left state here: never mix it into this one.
        for key in (p.STATE_META, p.STATE_ADAPTER, p.STATE_TENSORS):
            if key in state:
                del state[key]
        return
    if p.STATE_ADAPTER in state:
        node.set_adapter(p.record_to_tensors(state.array_records[p.STATE_ADAPTER]))
    if p.STATE_TENSORS in state:
        node.load_trainer_state(p.unpack_tree(state.array_records[p.STATE_TENSORS], str(meta["tree"])))


def save(node: Node, context: Context, job: p.Job, *, trainer: bool) -> None:
    state = context.state
    meta = state.config_records.get(p.STATE_META)
    tree = str(meta["tree"]) if meta is not None and "tree" in meta else ""
    if trainer:
        tensors, tree = p.pack_tree(node.trainer_state())
        state[p.STATE_TENSORS] = tensors
    state[p.STATE_ADAPTER] = p.tensors_to_record(node.adapter())
    state[p.STATE_META] = ConfigRecord(
        {"fingerprint": job.fingerprint, "run_id": int(context.run_id), "round": job.round, "tree": tree}
    )


def reply(message: Message, records: dict[str, ArrayRecord | ConfigRecord | MetricRecord]) -> Message:
    return Message(RecordDict(dict(records)), reply_to=message)


@app.query("describe")
def describe(message: Message, context: Context) -> Message:
    _, node = open_node(message, context)
    info = node.describe()
    record = ConfigRecord({k: v for k, v in info.items() if k != "label_names" and k != "mixture"})
    record["label_names"] = json.dumps(info["label_names"])
    record["mixture"] = json.dumps(info["mixture"])
    return reply(message, {p.INFO: record})


@app.train()
def train(message: Message, context: Context) -> Message:
    if secagg.is_fit_message(message):
        return secure_train(message, context)
    job, node = open_node(message, context)
    node.set_adapter(p.record_to_tensors(message.content.array_records[p.ADAPTER]))
    steps = job.args.get("steps")  # FedCoLLM: the node's own budget (local_epochs depends on its data)
    metrics = node.train(None if steps is None else int(steps))
    save(node, context, job, trainer=True)
    return reply(message, {p.ADAPTER: p.tensors_to_record(node.adapter()), p.METRICS: MetricRecord(metrics)})


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    job, node = open_node(message, context)
    node.set_adapter(p.record_to_tensors(message.content.array_records[p.ADAPTER]))
    metrics = node.evaluate()
    save(node, context, job, trainer=False)
    return reply(message, {p.METRICS: MetricRecord(metrics)})


@app.evaluate("peers")
def evaluate_peers(message: Message, context: Context) -> Message:
    job, node = open_node(message, context)
    peers = [int(j) for j in job.args["peers"]]
    adapters = [p.record_to_tensors(message.content.array_records[f"{p.PEER_PREFIX}{j}"]) for j in peers]
    row = node.peer_perplexity(adapters, int(job.args["val_batches"]))
    return reply(message, {p.METRICS: MetricRecord({"ppl": [float(x) for x in row]})})


@app.query("predict")
def predict(message: Message, context: Context) -> Message:
    job, node = open_node(message, context)
    a = job.args
    batches, vocab = node.predict(int(a["public_batches"]), int(a["batch_size"]), int(a["k"]))
    info = ConfigRecord({"public_hash": p.windows_hash(node.public), "vocab": vocab})
    return reply(message, {p.LOGITS: p.topk_to_record(batches), p.INFO: info})


def secure_train(message: Message, context: Context) -> Message:
    """A SecAgg+ round's training (FedCoLLM family): the same work, the legacy fit format for the mod."""
    config, adapter = secagg.fit_request(message)
    job, node = open_job(p.Job.from_record(ConfigRecord(config)), context)
    if not isinstance(node, FedCoLLMNode):
        raise ValueError("secure aggregation is implemented for the FedCoLLM family's FedAvg step")
    node.set_adapter(adapter)
    metrics = node.train()
    save(node, context, job, trainer=True)
    return secagg.fit_reply(message, node.adapter(), list(adapter), node.weight(), metrics)
