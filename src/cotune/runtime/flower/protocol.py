"""What travels between the cotune ServerApp and ClientApp: message types, record keys and codecs.

Adapters and any tensor state travel as Flower ``ArrayRecord`` s (one ``Array`` per record: a
safetensors buffer, never pickled); everything else is a ``ConfigRecord`` or ``MetricRecord``. Keeping the
wire format in one module means a new algorithm family adds message types here and nothing else
changes shape (FedCoLLM needed none: `query.describe` and `train` cover its rounds).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

# ---- message types: "<category>" or "<category>.<action>" (Flower routes on both) ------------------
DESCRIBE = "query.describe"  # who are you: partition id, data summary, public-set hash, label mixture
TRAIN = "train"  # adopt this adapter, train `steps` local steps, send the adapter back
EVALUATE = "evaluate"  # adopt this (aggregated) adapter and evaluate it on local validation data
EVALUATE_PEERS = "evaluate.peers"  # validation trust: perplexity of each peer adapter on local val data
PREDICT = "query.predict"  # prediction trust: top-k logits of the local adapter on the public set

# ---- record keys ------------------------------------------------------------------------------------
JOB = "cotune.job"  # ConfigRecord: algorithm family, config YAML + fingerprint, round, action arguments
ADAPTER = "cotune.adapter"  # ArrayRecord: one adapter, keyed as a saved peft adapter
PEER_PREFIX = "cotune.peer."  # ArrayRecord per peer adapter: cotune.peer.<client index>
METRICS = "cotune.metrics"  # MetricRecord: losses, perplexities, throughput
INFO = "cotune.info"  # ConfigRecord: a node's description (describe reply)
LOGITS = "cotune.logits"  # ArrayRecord: <batch>.values / <batch>.indices of the top-k logits
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


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    if PACKED not in record or record[PACKED].stype != SAFETENSORS:
        raise ValueError(
            "this record does not hold cotune's packed tensors (a node of another cotune version?)"
        )
    numbered = load_tensors(record[PACKED].data)
    return {name.split("|", 1)[1]: numbered[name] for name in sorted(numbered)}


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


# ---- the job record: what every message to a node carries ------------------------------------------------
@dataclass(frozen=True)
class Job:
    """The header of a message to a node: which experiment, which round, and the action's arguments."""

    family: str  # algorithm family: "personalized" or "fedcollm"
    config_yaml: str  # the resolved experiment config, as `cotune run` would write config.yaml
    fingerprint: str  # config_fingerprint(cfg): a node refuses to mix state from two configs
    round: int
    args: Mapping[str, Any]
    run_key: str = ""  # names this run across Flower runs (a resumed run is a new Flower run)
    # After `--resume`: client -> the last round it trained before the crash, whose state it reloads.
    resume: Mapping[int, int] | None = None

    def to_record(self) -> ConfigRecord:
        resume = "" if self.resume is None else json.dumps({str(k): r for k, r in self.resume.items()})
        return ConfigRecord(
            {
                "family": self.family,
                "config": self.config_yaml,
                "fingerprint": self.fingerprint,
                "round": self.round,
                "args": json.dumps(dict(self.args)),
                "run_key": self.run_key,
                "resume": resume,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Job:
        return cls(
            family=str(record["family"]),
            config_yaml=str(record["config"]),
            fingerprint=str(record["fingerprint"]),
            round=int(record["round"]),  # type: ignore[arg-type]
            args=json.loads(str(record["args"])),
            run_key=str(record.get("run_key", "")),
            resume={int(k): int(v) for k, v in json.loads(resume).items()}
            if (resume := str(record.get("resume", "")))
            else None,
        )


def job_of(message: Message) -> Job:
    if JOB not in message.content:
        raise ValueError(f"message {message.metadata.message_type!r} has no {JOB!r} record")
    return Job.from_record(message.content.config_records[JOB])


def content(
    job: Job, records: Mapping[str, ArrayRecord | ConfigRecord | MetricRecord] | None = None
) -> RecordDict:
    """A message body: the job header plus named records."""
    body = RecordDict({JOB: job.to_record()})
    for key, record in (records or {}).items():
        body[key] = record
    return body
