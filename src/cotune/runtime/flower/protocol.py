"""What travels between the cotune ServerApp and ClientApp: message types, record keys and codecs.

Adapters and any tensor state travel as Flower ``ArrayRecord`` s (one ``Array`` per record: a
safetensors buffer, never pickled). The clients' answers are the port's typed payloads
(`runtime.port`: `TrainReport`, `EvalReport`, `PeerScores`, `ClientInfo`), each carried by the one
codec here (`encode` / `decode`): a ``ConfigRecord`` of its kind and its fields as JSON text, so every
field travels exactly, nested metrics and lists included (a ``MetricRecord`` holds numbers and flat
lists only). In process the same dataclasses pass as they are. Keeping the wire format in one module
means a new algorithm family adds message types here and nothing else changes shape (FedCoLLM needed
none: `query.describe` and `train` cover its rounds).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from cotune.algorithms.compression import Compression, packed_adapter, unpacked_adapter
from cotune.runtime.port import Prediction

# ---- message types: "<category>" or "<category>.<action>" (Flower routes on both) ------------------
DESCRIBE = "query.describe"  # who are you: partition id, data summary, public-set hash, label mixture
TRAIN = "train"  # adopt this adapter, train `steps` local steps, send the adapter back
EVALUATE = "evaluate"  # adopt this (aggregated) adapter and evaluate it on local validation data
EVALUATE_PEERS = "evaluate.peers"  # validation trust: perplexity of each peer adapter on local val data
PREDICT = "query.predict"  # prediction trust: top-k logits of the local adapter on the public set

# ---- record keys ------------------------------------------------------------------------------------
JOB = "cotune.job"  # ConfigRecord: algorithm family, config YAML + fingerprint, round, action arguments
ADAPTER = "cotune.adapter"  # ArrayRecord: one adapter, keyed as a saved peft adapter
# ArrayRecord: a trained client's round update as federation.compress encodes it (compression.packed), in
# place of its adapter: the server adds it to the adapter it sent
UPDATE = "cotune.update"
PEER_PREFIX = "cotune.peer."  # ArrayRecord per peer adapter: cotune.peer.<client index>
REPORT = "cotune.report"  # ConfigRecord: a reply's typed payload (`encode`): report or description
LOGITS = "cotune.logits"  # ArrayRecord: <batch>.values / <batch>.indices of the top-k logits
PREDICTION = "cotune.prediction"  # ConfigRecord: the vocabulary size and public-set digest beside them
# ArrayRecord: FLoRA's merged history, components base_from..base_rank-1 (job args) that the node lacks
BASE = "cotune.base"

# ---- tensors <-> ArrayRecord ---------------------------------------------------------------------------
# Named tensors travel as ONE Flower Array holding a safetensors buffer, not one Array per tensor: Flower
# moves every Array as an object of its own, with a request per object on each hop (ServerApp ->
# SuperLink -> SuperNode -> ClientApp and back), and an adapter has hundreds of tensors (SmolLM2, r=4 on
# q/k/v/o: 240). The order of the names is kept by a numbered prefix inside the buffer.
PACKED = "cotune.tensors"  # the one Array of a packed record
SAFETENSORS = "safetensors"  # its stype


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Exact (bitwise, bfloat16 included, never pickled) encoding of named tensors; key order is kept."""
    # a compact copy of each: safetensors refuses tensors that share storage (views of one tensor)
    numbered = {
        f"{n:06d}|{key}": t.detach().cpu().clone(memory_format=torch.contiguous_format)
        for n, (key, t) in enumerate(tensors.items())
    }
    data = save_tensors(numbered)
    return ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(data),), stype=SAFETENSORS, data=data)})


def adapter_record(state: Mapping[str, torch.Tensor], spec: Compression) -> ArrayRecord:
    """An adapter the server sends: as it is, or with federation.compress its encoding (whole, with each
    tensor's shape), which the node decodes to the same bits the server keeps (every codec is idempotent)."""
    return tensors_to_record(state if spec.off else packed_adapter(state, spec))


def adapter_of(record: ArrayRecord, spec: Compression) -> dict[str, torch.Tensor]:
    """The adapter an `adapter_record` carries."""
    tensors = record_to_tensors(record)
    return tensors if spec.off else unpacked_adapter(tensors, spec)


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    if PACKED not in record or record[PACKED].stype != SAFETENSORS:
        raise ValueError(
            "this record does not hold cotune's packed tensors (a node of another cotune version?)"
        )
    numbered = load_tensors(record[PACKED].data)
    return {name.split("|", 1)[1]: numbered[name] for name in sorted(numbered)}


# ---- the port's payloads <-> ConfigRecord: the one codec ---------------------------------------------------
P = TypeVar("P")
KIND, FIELDS = "kind", "json"  # the record's two entries: the payload's class name, its fields as JSON


def encode(payload: Any) -> ConfigRecord:
    """A frozen payload dataclass as a ConfigRecord. JSON keeps every float exactly (Python writes the
    shortest text that reads back to the same bits; nan and inf as JSON's NaN / Infinity)."""
    return ConfigRecord({KIND: type(payload).__name__, FIELDS: json.dumps(dataclasses.asdict(payload))})


def decode(record: ConfigRecord, kind: type[P]) -> P:
    """`encode`'s payload back as `kind`, every field checked against its type (a reply of another
    cotune version, or not a cotune reply, is a ValueError that names what differs)."""
    if record.get(KIND) != kind.__name__:
        raise ValueError(f"expected a {kind.__name__} reply, got {str(record.get(KIND))[:40]!r}")
    return typed(kind, json.loads(str(record[FIELDS])), kind.__name__)


def typed(kind: Any, value: Any, where: str) -> Any:
    """`value` (parsed JSON) as the type `kind` of a payload field: dataclasses, `X | None`,
    `tuple[X, ...]`, `Mapping[K, V]` (integer keys from their JSON text), int, float, str, bool, Any."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: not an object")
        hints = typing.get_type_hints(kind)
        known = [f.name for f in dataclasses.fields(kind) if f.name in value]
        try:
            return kind(**{n: typed(hints[n], value[n], f"{where}.{n}") for n in known})
        except TypeError as e:  # a field without default is missing
            raise ValueError(f"{where}: {e}") from None
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return typed(inner, value, where)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and isinstance(value, list):
        return tuple(typed(args[0], v, f"{where}[{n}]") for n, v in enumerate(value))
    if origin in (Mapping, dict) and isinstance(value, dict):
        key = int if args and args[0] is int else str
        if not args or args[1] is Any:
            return value
        return {key(k): typed(args[1], v, f"{where}[{k}]") for k, v in value.items()}
    if kind is Any:
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind in (int, str, bool) and type(value) is kind:
        return value
    raise ValueError(f"{where}: not {getattr(kind, '__name__', kind)}")


# ---- prediction trust: top-k logits ---------------------------------------------------------------------
def topk_to_record(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> ArrayRecord:
    """Per public batch, the (values, indices) of torch.topk over the vocabulary."""
    tensors: dict[str, torch.Tensor] = {}
    for b, (values, indices) in enumerate(batches):
        tensors[f"{b}.values"] = values
        tensors[f"{b}.indices"] = indices.to(torch.int32 if indices.max() < 2**31 else torch.int64)
    return tensors_to_record(tensors)


def record_to_topk(record: ArrayRecord) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tensors = record_to_tensors(record)
    n = len(tensors) // 2
    return [(tensors[f"{b}.values"], tensors[f"{b}.indices"].long()) for b in range(n)]


def prediction_records(prediction: Prediction) -> dict[str, ArrayRecord | ConfigRecord]:
    """A `Prediction` as a reply's records: its top-k logits, and its vocabulary size and set digest."""
    about = ConfigRecord({"vocab": prediction.vocab, "public_hash": prediction.public_hash})
    return {LOGITS: topk_to_record(prediction.topk), PREDICTION: about}


def prediction_of(body: RecordDict) -> Prediction:
    about = body.config_records[PREDICTION]
    vocab, public_hash = about["vocab"], about["public_hash"]
    if not isinstance(vocab, int) or not isinstance(public_hash, str):
        raise ValueError("a prediction reply without its vocabulary size and public-set digest")
    return Prediction(record_to_topk(body.array_records[LOGITS]), vocab, public_hash)


# ---- the job: what every message to a node carries (through the codec above) ------------------------------
@dataclass(frozen=True)
class PeerArgs:
    """`evaluate.peers`: whose adapters the message brings (their rows' order) and how many batches."""

    peers: tuple[int, ...]
    val_batches: int


@dataclass(frozen=True)
class PredictArgs:
    """`query.predict`: how many public batches of which size, and the top-k logits to keep."""

    batches: int
    batch_size: int
    k: int


@dataclass(frozen=True)
class BaseRange:
    """FLoRA: the merged update's rank, and the first component the message brings (`BASE`)."""

    rank: int
    start: int


@dataclass(frozen=True)
class Job:
    """The header of a message to a node: which experiment, which round, and the action's arguments."""

    family: str  # algorithm family: "personalized" or "fedcollm"
    config_yaml: str  # the resolved experiment config, as `cotune run` would write config.yaml
    fingerprint: str  # config_fingerprint(cfg): a node refuses to mix state from two configs
    round: int
    run_key: str = ""  # names this run across Flower runs (a resumed run is a new Flower run)
    # After `--resume`: client -> the last round it trained before the crash, whose state it reloads.
    resume: Mapping[int, int] | None = None
    steps: int | None = None  # train: local steps (None: the node's own budget, FedCoLLM's local_epochs)
    peers: PeerArgs | None = None
    predict: PredictArgs | None = None
    weights: Mapping[int, int] | None = None  # SecAgg+ train: each client's server-checked FedAvg weight
    base: BaseRange | None = None


def job_of(message: Message) -> Job:
    if JOB not in message.content:
        raise ValueError(f"message {message.metadata.message_type!r} has no {JOB!r} record")
    return decode(message.content.config_records[JOB], Job)


def content(
    job: Job, records: Mapping[str, ArrayRecord | ConfigRecord | MetricRecord] | None = None
) -> RecordDict:
    """A message body: the job header plus named records."""
    body = RecordDict({JOB: encode(job)})
    for key, record in (records or {}).items():
        body[key] = record
    return body
