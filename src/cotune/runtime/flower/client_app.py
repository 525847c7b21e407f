"""The cotune ClientApp: what a SuperNode (one data owner) does with each message of the ServerApp.

Every handler rebuilds the node from the config the message carries plus the node's `Context.state`
(its adapter, trainer state and RNG from earlier messages of this run), calls one `ClientWork`
method, saves the state back and replies. Flower turns an exception into an error reply, which the
server's transport reports as a failed client.

Message types (see protocol.py): `query.describe`, `train`, `evaluate`, and the trust evidence
actions `evaluate.peers` (validation trust) and `query.predict` (prediction trust).
"""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from cotune.runtime.flower import protocol as p
from cotune.runtime.flower import secagg
from cotune.runtime.flower.node import Node, NodeSettings, node_config

# SecAgg+ (federation.secure_aggregation): the protocol's messages pass through Flower's secaggplus_mod.
app = ClientApp(mods=[secagg.maybe_secaggplus])


def open_node(message: Message, context: Context) -> tuple[p.Job, Node]:
    """The node as it was after the previous message of this run (fresh on the first one)."""
    return open_job(p.job_of(message), context)


def open_job(job: p.Job, context: Context) -> tuple[p.Job, Node]:
    settings = NodeSettings.from_node_config(context.node_config)
    node = Node(job.family, node_config(job.config_yaml, settings), settings)
    restore(node, context, job)
    node.seed_if_new()
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
        node.work.adopt(p.record_to_tensors(state.array_records[p.STATE_ADAPTER]))
    if p.STATE_TENSORS in state:
        node.load_trainer_state(p.unpack_tree(state.array_records[p.STATE_TENSORS], str(meta["tree"])))


def save(node: Node, context: Context, job: p.Job, *, trainer: bool) -> None:
    state = context.state
    meta = state.config_records.get(p.STATE_META)
    tree = str(meta["tree"]) if meta is not None and "tree" in meta else ""
    if trainer:
        tensors, tree = p.pack_tree(node.trainer_state())
        state[p.STATE_TENSORS] = tensors
    state[p.STATE_ADAPTER] = p.tensors_to_record(node.work.adapter())
    state[p.STATE_META] = ConfigRecord(
        {"fingerprint": job.fingerprint, "run_id": int(context.run_id), "round": job.round, "tree": tree}
    )


def reply(message: Message, records: dict[str, ArrayRecord | ConfigRecord | MetricRecord]) -> Message:
    return Message(RecordDict(dict(records)), reply_to=message)


def adopt_sent(node: Node, message: Message) -> None:
    if p.ADAPTER in message.content.array_records:
        node.adopt(p.record_to_tensors(message.content.array_records[p.ADAPTER]))


@app.query("describe")
def describe(message: Message, context: Context) -> Message:
    _, node = open_node(message, context)
    info = node.work.describe()
    record = ConfigRecord({k: v for k, v in info.items() if k not in ("label_names", "mixture")})
    record["label_names"] = json.dumps(info.get("label_names", []))
    record["mixture"] = json.dumps(info.get("mixture", []))
    return reply(message, {p.INFO: record})


@app.train()
def train(message: Message, context: Context) -> Message:
    if secagg.is_fit_message(message):
        return secure_train(message, context)
    job, node = open_node(message, context)
    adopt_sent(node, message)
    steps = job.args.get("steps")  # FedCoLLM: the node's own budget (local_epochs depends on its data)
    metrics = node.work.train(None if steps is None else int(steps))
    save(node, context, job, trainer=True)
    return reply(
        message, {p.ADAPTER: p.tensors_to_record(node.work.adapter()), p.METRICS: MetricRecord(metrics)}
    )


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    job, node = open_node(message, context)
    adopt_sent(node, message)
    metrics = node.work.evaluate()
    save(node, context, job, trainer=False)
    return reply(message, {p.METRICS: MetricRecord(metrics)})


@app.evaluate("peers")
def evaluate_peers(message: Message, context: Context) -> Message:
    job, node = open_node(message, context)
    peers = [int(j) for j in job.args["peers"]]
    adapters = [p.record_to_tensors(message.content.array_records[f"{p.PEER_PREFIX}{j}"]) for j in peers]
    row = node.work.peer_perplexity(adapters, int(job.args["val_batches"]))
    return reply(message, {p.METRICS: MetricRecord({"ppl": [float(x) for x in row]})})


@app.query("predict")
def predict(message: Message, context: Context) -> Message:
    job, node = open_node(message, context)
    adopt_sent(node, message)
    a = job.args
    pred = node.work.predict(int(a["public_batches"]), int(a["batch_size"]), int(a["k"]))
    info = ConfigRecord({"public_hash": pred.public_hash, "vocab": pred.vocab})
    return reply(message, {p.LOGITS: p.topk_to_record(pred.topk), p.INFO: info})


def secure_train(message: Message, context: Context) -> Message:
    """A SecAgg+ round's training (FedCoLLM family): the same work, the legacy fit format for the mod."""
    config, adapter = secagg.fit_request(message)
    job, node = open_job(p.Job.from_record(ConfigRecord(config)), context)
    if node.family != "fedcollm":
        raise ValueError("secure aggregation is implemented for the FedCoLLM family's FedAvg step")
    node.adopt(adapter)
    metrics = node.work.train()
    save(node, context, job, trainer=True)
    return secagg.fit_reply(message, node.work.adapter(), list(adapter), node.weight(), metrics)
