"""cotune on Flower, in process: the wire codecs, the ServerApp/ClientApp protocol against the embedded
runtime (bit for bit), and fault handling. A fake Grid hands each message straight to the real
ClientApp with one Context per simulated SuperNode; the process-level deployment (SuperLink +
SuperNodes) is tests/integration/test_flower_local.py.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import pytest

# Before flwr is first imported (it reads these at import time): no telemetry, no update check.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
pytest.importorskip("flwr")

import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console
from safetensors.torch import load_file
from tests.conftest import tiny_tree
from tests.test_cotuning import task_file, tree  # noqa: F401  (task_file: the FedCoLLM task fixture)

from cotune.algorithms.ranks import rank_of
from cotune.algorithms.trust import PredictionDistance
from cotune.config import config_from_dict, dump_config
from cotune.records import CLOCK_FIELDS
from cotune.reporting.metrics import read_metrics
from cotune.runtime.checkpoint import latest_checkpoint, list_checkpoints
from cotune.runtime.experiment import run_experiment
from cotune.runtime.flower import FlowerRunError
from cotune.runtime.flower import protocol as p
from cotune.runtime.flower.app import APP_COMPONENTS, APP_CONFIG, with_run_settings, write_app_dir
from cotune.runtime.flower.client_app import app as client_app
from cotune.runtime.flower.clients import FlowerClients, ServerSettings
from cotune.runtime.flower.handlers import node_app
from cotune.runtime.flower.node import NodeSettings, node_config
from cotune.runtime.flower.node_state import NodeStateStore
from cotune.runtime.flower.outcome import check_outcome
from cotune.runtime.flower.server_app import (
    check_resumable,
    experiment_config,
    prepare_run_dir,
    run_server,
    server_loop,
)
from cotune.runtime.flower.worker import WORKER_KEY, NodeWorker, WorkerError, forward, run_worker
from cotune.runtime.port import ClientInfo
from cotune.runtime.rundir import ResumeError, is_flower_run
from cotune.training.loop import make_optimizer, make_scheduler

ROOT = Path(__file__).resolve().parents[1]

# A node's fate: given (client index, message), return None to answer normally, "silent" to never
# answer (a disconnected SuperNode), "gone" for the SuperLink's node-unavailable reply, "error" to
# raise in the ClientApp (Flower's error reply), or
# "nan" to answer with an adapter full of NaN (a broken or malicious node).
Fate = Callable[[int, Message], str | None]


class ServerKilled(BaseException):
    """Like SIGKILL for the ServerApp: nothing of it is caught, logged or cleaned up."""


class InProcessGrid(Grid):
    """SuperNodes in this process: the real ClientApp, one Context (state) per node, no network."""

    def __init__(
        self, n_nodes: int, fate: Fate | None = None, run_id: int = 7, worker: Path | None = None
    ) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 1, 1
        extra = {WORKER_KEY: str(worker)} if worker else {}  # every node's work done by that node worker
        # node ids deliberately unrelated to partition ids: the server must ask
        self.contexts = {
            9000 - 7 * i: Context(
                run_id=run_id,
                node_id=9000 - 7 * i,
                node_config={"partition-id": i, "num-partitions": n_nodes, **extra},
                state=RecordDict(),
                run_config={},
            )
            for i in range(n_nodes)
        }
        self.fate = fate or (lambda i, m: None)
        self.sent: list[tuple[int, str]] = []
        self.replies: list[Message] = []
        self.waiting: dict[str, Message] = {}  # replies not pulled yet, by the message replied to

    def set_run(self, run):  # type: ignore[no-untyped-def]
        pass

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Each message is answered at once (or never: a silent node); the replies wait to be pulled."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            reply = self.deliver(msg)
            if reply is not None:
                self.waiting[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.waiting.pop(i) for i in list(message_ids) if i in self.waiting]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))  # Flower's SecAgg+ workflow calls this

    def deliver(self, msg: Message) -> Message | None:
        ctx = self.contexts[msg.metadata.dst_node_id]
        index = int(ctx.node_config["partition-id"])
        self.sent.append((index, msg.metadata.message_type))
        fate = self.fate(index, msg)
        if fate == "silent":
            return None
        if fate == "server dies":
            raise ServerKilled(f"the ServerApp was killed while sending {msg.metadata.message_type}")
        try:
            if fate == "error":
                raise RuntimeError("simulated ClientApp crash")
            if fate == "gone":  # what the SuperLink answers for a SuperNode it lost
                return Message(
                    Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node unavailable"), reply_to=msg
                )
            # a copy, as the wire would deliver it (SecAgg+ messages share one content object)
            reply = client_app(copy.deepcopy(msg), ctx)
            if fate == "claims a billion" and p.REPORT in reply.content.config_records:
                info = p.decode(reply.content.config_records[p.REPORT], ClientInfo)
                reply.content.config_records[p.REPORT] = p.encode(replace(info, examples=10**9))
            if fate == "nan" and p.ADAPTER in reply.content.array_records:
                sent = p.record_to_tensors(reply.content.array_records[p.ADAPTER])
                poisoned = {k: torch.full_like(v, float("nan")) for k, v in sent.items()}
                reply.content.array_records[p.ADAPTER] = p.tensors_to_record(poisoned)
            self.replies.append(reply)
            return reply
        except Exception as exc:  # what Flower does with a ClientApp exception
            return Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)


def _cfg(corpus_dir: Path, tmp_path: Path, **sections):
    return config_from_dict(tiny_tree(corpus_dir, tmp_path, run={"threads": 1}, **sections))


def _run_flower_in_process(
    cfg, run_dir: Path, grid: InProcessGrid, settings: ServerSettings | None = None
) -> str:
    prepare_run_dir(run_dir, cfg)
    settings = settings or ServerSettings.from_config(cfg)
    return run_server(cfg, run_dir, grid, settings, say=lambda s: None)


def _adapters(
    run_dir: Path, round_: int | None = None, pattern: str = "client-*"
) -> dict[str, dict[str, torch.Tensor]]:
    found = dict(list_checkpoints(run_dir))
    path = found[round_] if round_ is not None else latest_checkpoint(run_dir)[1]
    dirs = [d for d in sorted(path.glob(pattern)) if d.is_dir()]
    return {d.name: load_file(str(d / "adapter_model.safetensors")) for d in dirs}


def max_adapter_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[c][k] - b[c][k]).abs().max()) for c in a for k in a[c])


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if m["type"] == kind]


# ---- codecs ----------------------------------------------------------------------------------------
def test_tensors_travel_bit_exactly_including_bfloat16():
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(2, 2).to(torch.bfloat16),
        "c": torch.tensor(5.0),
        "d": torch.arange(6, dtype=torch.int64).view(2, 3),
    }
    back = p.record_to_tensors(p.tensors_to_record(tensors))
    assert list(back) == list(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])
    # the order of the names survives even when it is not sorted, and views of one tensor are sent as
    # themselves
    wide = torch.randn(4, 8)
    unsorted = {"z": wide[:, :3], "a": torch.randn(2), "m.lora_A": wide[1], "m.lora_B": wide}
    back = p.record_to_tensors(p.tensors_to_record(unsorted))
    assert list(back) == ["z", "a", "m.lora_A", "m.lora_B"]
    assert all(torch.equal(back[k], unsorted[k]) for k in unsorted)


def test_an_adapter_travels_as_one_flower_object_not_one_per_tensor():
    """Flower moves every Array as an object with a request per hop: an adapter of hundreds of tensors
    must be one Array (one chunk up to 5 MB)."""
    adapter = {f"layers.{i}.q_proj.lora_{ab}.weight": torch.randn(4, 576) for i in range(30) for ab in "AB"}
    record = p.tensors_to_record(adapter)
    assert len(record) == 1
    with pytest.raises(ValueError, match="packed tensors"):
        p.record_to_tensors(ArrayRecord({"x": Array(torch.randn(2).numpy())}))


def test_optimizer_and_schedule_state_survive_the_trip(corpus_dir, tmp_path):
    cfg = _cfg(corpus_dir, tmp_path)
    torch.manual_seed(0)

    def make():
        lin = torch.nn.Linear(4, 3)
        opt = make_optimizer(lin.parameters(), cfg.train)
        return lin, opt, make_scheduler(opt, 10, cfg.train)

    def step(lin, opt, sched):
        lin(torch.ones(2, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    lin, opt, sched = make()
    for _ in range(3):
        step(lin, opt, sched)
    store = NodeStateStore(tmp_path / "nodes", "ab" * 8, 0)  # what a SuperNode keeps between rounds
    store.save(1, {}, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    _, state = store.load(1)
    lin2, opt2, sched2 = make()
    lin2.load_state_dict(lin.state_dict())
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]  # a tuple again
    step(lin, opt, sched)
    step(lin2, opt2, sched2)
    for a, b in zip(lin.parameters(), lin2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_top_k_logits_give_the_distances_of_the_full_logits():
    torch.manual_seed(0)
    batches = [[torch.randn(2, 5, 50) for _ in range(3)] for _ in range(2)]
    full, sent = PredictionDistance(3, k=7), PredictionDistance(3, k=7)
    for logits in batches:
        full.add_batch(logits)
        topk = [p.record_to_topk(p.topk_to_record([x.topk(7, dim=-1)]))[0] for x in logits]
        sent.add_topk(topk)
    assert torch.equal(full.distances(), sent.distances())


# ---- the protocol against the embedded runtime -----------------------------------------------------------
@pytest.mark.parametrize("strategy", ["fedavg", "local", "weight", "validation", "prediction", "oracle"])
@pytest.mark.slow
def test_flower_protocol_gives_the_embedded_results_bit_for_bit(corpus_dir, tmp_path, strategy):
    cfg = _cfg(corpus_dir, tmp_path, strategy={"name": strategy})
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    grid = InProcessGrid(cfg.federation.clients)
    assert _run_flower_in_process(cfg, tmp_path / "flower", grid) == "completed"

    flower = tmp_path / "flower"
    assert max_adapter_diff(_adapters(embedded), _adapters(flower)) == 0.0
    assert [r["matrix"] for r in _records(embedded, "trust")] == [
        r["matrix"] for r in _records(flower, "trust")
    ]
    keys = ("round", "client", "loss", "ppl", "acc", "tokens")
    evals = [[{k: r[k] for k in keys} for r in _records(d, "eval")] for d in (embedded, flower)]
    assert evals[0] == evals[1]
    assert [r["loss"] for r in _records(embedded, "train")] == [r["loss"] for r in _records(flower, "train")]
    # the named actions carry the evidence, and only the strategy that needs it asks for it
    types = {t for _, t in grid.sent}
    assert (p.EVALUATE_PEERS in types) == (strategy == "validation")
    assert (p.PREDICT in types) == (strategy == "prediction")


def test_protected_evidence_on_flower_gives_the_embedded_results_bit_for_bit(corpus_dir, tmp_path):
    """privacy.evidence_clip: each node clips and noises its logits itself, its noise that of the round
    the message names and its own client (a seeded `privacy` stream), so trust and adapters match."""
    privacy = {"evidence_clip": 2.0, "evidence_noise_multiplier": 0.5, "seed": 4}
    cfg = _cfg(corpus_dir, tmp_path, strategy={"name": "prediction"}, privacy=privacy)
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    grid = InProcessGrid(cfg.federation.clients)
    assert _run_flower_in_process(cfg, tmp_path / "flower", grid) == "completed"
    flower = tmp_path / "flower"
    assert max_adapter_diff(_adapters(embedded), _adapters(flower)) == 0.0
    _same_records(embedded, flower, ("trust", "privacy"))
    assert len({str(r["matrix"]) for r in _records(flower, "trust")}) == 2  # each round its own noise


@pytest.mark.parametrize("strategy", ["validation", "prediction"])
def test_personalized_generation_on_flower_gives_the_embedded_results_bit_for_bit(tmp_path, strategy):
    """Generation data (data.kind generation): the same adapters, trust, response perplexities and test
    generation scores through the ServerApp/ClientApp as embedded; the scores travel in EvalReport.gen."""
    from tests.test_personalized_generation import gen_tree

    cfg = config_from_dict(gen_tree(tmp_path, strategy={"name": strategy}))
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    grid = InProcessGrid(cfg.federation.clients)
    assert _run_flower_in_process(cfg, tmp_path / "flower", grid) == "completed"
    flower = tmp_path / "flower"
    assert max_adapter_diff(_adapters(embedded), _adapters(flower)) == 0.0
    for kind in ("trust", "eval", "gen"):
        ours, theirs = _records(embedded, kind), _records(flower, kind)
        drop = CLOCK_FIELDS
        assert [{k: v for k, v in r.items() if k not in drop} for r in ours] == [
            {k: v for k, v in r.items() if k not in drop} for r in theirs
        ], kind
    assert len(_records(flower, "gen")) == 3 * cfg.federation.clients


def _same_records(embedded: Path, flower: Path, kinds: Iterable[str]) -> None:
    """The records of each kind equal in both runs but for their timings."""
    drop = CLOCK_FIELDS
    for kind in kinds:
        ours, theirs = _records(embedded, kind), _records(flower, kind)
        assert [{k: v for k, v in r.items() if k not in drop} for r in ours] == [
            {k: v for k, v in r.items() if k not in drop} for r in theirs
        ], kind


@pytest.mark.parametrize("strategy", ["validation", "prediction"])
def test_nodes_with_their_own_generation_files_give_the_embedded_per_owner_results(tmp_path, strategy):
    """Per-owner generation data: each SuperNode reads its own JSONL (data-path) and the public file
    (public-path) and splits it as embedded data.clients splits that owner's file; the adapters, trust,
    perplexities and test generation scores are the embedded run's bit for bit, and no node reads the
    config's data.clients (those paths need not exist on a node)."""
    from tests.test_personalized_generation import CANARY, LABELS, gen_tree, write_examples

    owners = [write_examples(tmp_path / f"owner{i}.jsonl", 6, (lab,)) for i, lab in enumerate(LABELS)]
    public = write_examples(tmp_path / "public.jsonl", 2)
    tree = gen_tree(tmp_path, strategy={"name": strategy})
    del tree["data"]["path"]
    tree["data"] |= {"clients": [str(o) for o in owners], "public": str(public)}
    cfg = config_from_dict(tree)
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")

    grid = InProcessGrid(cfg.federation.clients)
    for ctx in grid.contexts.values():
        own = owners[int(ctx.node_config["partition-id"])]
        ctx.node_config["data-path"] = str(shutil.copy(own, tmp_path / f"node-{own.name}"))  # its disk
        ctx.node_config["public-path"] = str(shutil.copy(public, tmp_path / f"node-{own.stem}-public.jsonl"))
    moved = tmp_path / "server-side"  # the config's owner files are not where the nodes are
    moved.mkdir()
    for path in (*owners, public):
        path.rename(moved / path.name)
    assert _run_flower_in_process(cfg, tmp_path / "flower", grid) == "completed"
    flower = tmp_path / "flower"
    assert max_adapter_diff(_adapters(embedded), _adapters(flower)) == 0.0
    _same_records(embedded, flower, ("trust", "eval", "gen", "train"))
    assert len(_records(flower, "gen")) == 3 * cfg.federation.clients
    assert CANARY not in (flower / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_evaluation_and_evidence_count_each_client_as_its_reply_arrives(corpus_dir, tmp_path):
    """The progress of evaluate / evaluate_peers / predict on Flower: on_done once per client whose reply
    (an answer or an error) arrived; a silent node is not counted."""

    def fate(i: int, msg: Message) -> str | None:
        return {1: "error", 3: "silent"}.get(i) if msg.metadata.message_type != p.DESCRIBE else None

    cfg = _cfg(corpus_dir, tmp_path, strategy={"name": "validation"})
    prepare_run_dir(tmp_path / "run", cfg)
    clients = FlowerClients(
        cfg, InProcessGrid(4, fate), cfg.family, ServerSettings(round_timeout=0.5), say=print
    )
    loop = server_loop(cfg, tmp_path / "run", clients, Console(file=io.StringIO()))
    clients.describe()
    adapters = dict(enumerate(loop.adapters))
    for exchange in (
        lambda on_done: clients.evaluate(1, adapters, on_done),
        lambda on_done: clients.evaluate_peers(1, adapters, 1, on_done),
        lambda on_done: clients.predict(1, adapters, 1, 4, 5, on_done),
    ):
        done: list[int] = []
        replies = exchange(done.append)
        assert sorted(replies.ok) == [0, 2] and sorted(replies.failed) == [1, 3]
        assert sorted(done) == [0, 1, 2]


def test_a_nan_upload_from_a_supernode_is_rejected_as_in_the_embedded_runtime(corpus_dir, tmp_path):
    """Flower's personalized server screens uploads with the embedded code: same rejections, same result."""
    sections = {"strategy": {"name": "validation"}, "federation": {"min_clients": 3}}
    cfg = _cfg(corpus_dir, tmp_path, **sections)
    attacked = _cfg(corpus_dir, tmp_path, **sections, simulation={"attack": {"clients": [3], "kind": "nan"}})
    (embedded,) = run_experiment(attacked, tmp_path / "embedded")

    def fate(i: int, msg: Message) -> str | None:
        return "nan" if i == 3 and msg.metadata.message_type == p.TRAIN else None

    flower = tmp_path / "flower"
    assert _run_flower_in_process(cfg, flower, InProcessGrid(4, fate)) == "completed"
    rejected = [
        (r["round"], r["client"]) for r in _records(flower, "fault") if r["event"] == "update_rejected"
    ]
    assert rejected == [(r, 3) for r in range(1, cfg.federation.rounds + 1)]
    assert all("NaN" in r["reason"] or "nan" in r["reason"] for r in _records(flower, "fault"))
    assert max_adapter_diff(_adapters(embedded), _adapters(flower)) == 0.0
    assert all(not torch.isnan(t).any() for a in _adapters(flower).values() for t in a.values())


@pytest.mark.parametrize(
    "sections",
    [
        {"robustness": {"aggregator": "median"}},
        {"privacy": {"clip_norm": 0.05, "noise_multiplier": 1.0, "seed": 3}},
    ],
    ids=["median", "dp"],
)
@pytest.mark.slow
def test_robust_and_private_fedavg_on_flower_match_the_embedded_runtime(corpus_dir, tmp_path, sections):
    cfg = _cfg(corpus_dir, tmp_path, strategy={"name": "fedavg"}, **sections)
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    flower = tmp_path / "flower"
    assert _run_flower_in_process(cfg, flower, InProcessGrid(cfg.federation.clients)) == "completed"
    assert max_adapter_diff(_adapters(embedded), _adapters(flower)) == 0.0
    assert len(_records(flower, "privacy")) == len(_records(embedded, "privacy"))


def node_states(root: Path, client: int) -> list[Path]:
    return sorted(root.glob(f"cotune/nodes/*/client-{client}/round-*.pt"))


def test_each_node_keeps_its_optimizer_state_on_its_own_disk(corpus_dir, tmp_path, node_state_in_tmp):
    cfg = _cfg(corpus_dir, tmp_path, federation={"rounds": 1})
    grid = InProcessGrid(cfg.federation.clients)
    _run_flower_in_process(cfg, tmp_path / "run", grid)
    for i in range(cfg.federation.clients):
        (path,) = node_states(node_state_in_tmp, i)
        tree = torch.load(path, weights_only=True)["trainer"]
        steps = {float(s["step"]) for s in tree["optimizer"]["state"].values()}
        assert steps == {cfg.federation.warmup_steps + cfg.federation.local_steps}
        assert tree["scheduler"]["last_epoch"] == cfg.federation.warmup_steps + cfg.federation.local_steps


def test_state_of_another_config_is_never_reused(corpus_dir, tmp_path):
    cfg = _cfg(corpus_dir, tmp_path, federation={"rounds": 1})
    grid = InProcessGrid(cfg.federation.clients)
    _run_flower_in_process(cfg, tmp_path / "a", grid)
    other = _cfg(corpus_dir, tmp_path, federation={"rounds": 1}, train={"lr": 5e-3})
    _run_flower_in_process(other, tmp_path / "b", grid)  # same nodes, same run id, other config
    (fresh,) = run_experiment(other, tmp_path / "embedded")
    assert max_adapter_diff(_adapters(fresh), _adapters(tmp_path / "b")) == 0.0


# ---- resume ----------------------------------------------------------------------------------------
def _killed_in_round(r: int) -> Fate:
    return lambda i, msg: "server dies" if p.job_of(msg).round == r and i == 1 else None


def _resume_in_process(cfg, run_dir: Path, grid: InProcessGrid) -> str:
    return run_server(cfg, run_dir, grid, ServerSettings.from_config(cfg), say=lambda s: None, resume=True)


@pytest.mark.parametrize("strategy", ["validation", "prediction"])
@pytest.mark.slow
def test_a_flower_run_resumes_after_the_server_died_with_the_uninterrupted_adapters(
    corpus_dir, tmp_path, strategy
):
    cfg = _cfg(corpus_dir, tmp_path, strategy={"name": strategy}, federation={"rounds": 3})
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    run_dir = tmp_path / "flower"
    with pytest.raises(ServerKilled):  # in round 3, after some nodes trained it
        _run_flower_in_process(cfg, run_dir, InProcessGrid(4, _killed_in_round(3)))
    assert [r for r, _ in list_checkpoints(run_dir)] == [0, 1, 2]
    # a resumed run is a new Flower run: fresh node contexts (empty memory), the nodes' own disks
    assert _resume_in_process(cfg, run_dir, InProcessGrid(4, run_id=8)) == "completed"
    assert max_adapter_diff(_adapters(embedded), _adapters(run_dir)) == 0.0
    keys = ("round", "client", "loss", "ppl")
    evals = [[{k: r[k] for k in keys} for r in _records(d, "eval")] for d in (embedded, run_dir)]
    assert evals[0] == evals[1]  # round 3's half-written records were dropped, not doubled
    assert [r["matrix"] for r in _records(embedded, "trust")] == [
        r["matrix"] for r in _records(run_dir, "trust")
    ]


@pytest.mark.parametrize("algorithm", ["fedcollm", "standalone"])
@pytest.mark.slow
def test_a_fedcollm_flower_run_resumes_with_the_uninterrupted_adapters(task_file, tmp_path, algorithm):  # noqa: F811
    cfg = config_from_dict(tree(task_file, tmp_path, algorithm, run={"threads": 1}, federation={"rounds": 3}))
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    run_dir = tmp_path / "flower"
    with pytest.raises(ServerKilled):
        _run_flower_in_process(cfg, run_dir, InProcessGrid(3, _killed_in_round(2)))
    assert _resume_in_process(cfg, run_dir, InProcessGrid(3, run_id=8)) == "completed"
    assert max_adapter_diff(_adapters(embedded, pattern="*"), _adapters(run_dir, pattern="*")) == 0.0


def test_a_node_that_lost_its_state_is_dropped_not_restarted_silently(
    corpus_dir, tmp_path, node_state_in_tmp
):
    cfg = _cfg(corpus_dir, tmp_path, federation={"rounds": 3})
    run_dir = tmp_path / "flower"
    with pytest.raises(ServerKilled):
        _run_flower_in_process(cfg, run_dir, InProcessGrid(4, _killed_in_round(3)))
    (lost,) = node_state_in_tmp.glob("cotune/nodes/*/client-2")
    shutil.rmtree(lost)  # client 2's disk is gone
    assert _resume_in_process(cfg, run_dir, InProcessGrid(4, run_id=8)) == "stopped"
    (fault,) = _records(run_dir, "fault")
    assert (fault["round"], fault["client"]) == (3, 2)
    assert "no saved state for round 2" in fault["reason"]
    assert [r for r, _ in list_checkpoints(run_dir)] == [0, 1, 2]  # nothing after the resumed round


def test_only_a_flower_checkpoint_of_this_config_is_resumed_on_flower(corpus_dir, tmp_path):
    cfg = _cfg(corpus_dir, tmp_path, federation={"rounds": 1})
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    with pytest.raises(ResumeError, match="was not run on Flower"):
        check_resumable(embedded, cfg)
    flower = tmp_path / "flower"
    _run_flower_in_process(cfg, flower, InProcessGrid(4))
    other = _cfg(corpus_dir, tmp_path, federation={"rounds": 1}, train={"lr": 5e-3})
    with pytest.raises(ResumeError, match="different config"):
        check_resumable(flower, other)


# ---- faults ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_client_that_disconnects_is_reported_and_the_round_goes_on(corpus_dir, tmp_path):
    cfg = _cfg(corpus_dir, tmp_path, strategy={"name": "validation"}, federation={"min_clients": 3})

    def fate(i: int, msg: Message) -> str | None:
        gone = i == 3 and p.job_of(msg).round >= 2
        return "silent" if gone else None

    run_dir = tmp_path / "run"
    status = _run_flower_in_process(cfg, run_dir, InProcessGrid(4, fate), ServerSettings(round_timeout=0.5))
    assert status == "completed"
    (fault,) = _records(run_dir, "fault")
    assert (fault["round"], fault["phase"], fault["client"]) == (2, "train", 3)
    assert "no reply" in fault["reason"]
    last = _records(run_dir, "trust")[-1]
    assert last["participants"] == [0, 1, 2]
    assert last["matrix"][3] == [0.0, 0.0, 0.0, 1.0]  # the absent client keeps its own adapter
    assert {r["client"] for r in _records(run_dir, "eval") if r["round"] == 2} == {0, 1, 2}
    round1, final = _adapters(run_dir, 1), _adapters(run_dir)
    assert max_adapter_diff({"c": round1["client-03"]}, {"c": final["client-03"]}) == 0.0
    assert max_adapter_diff({"c": round1["client-00"]}, {"c": final["client-00"]}) > 0.0


@pytest.mark.slow
def test_too_few_clients_stop_the_run_cleanly_with_the_last_checkpoint_intact(corpus_dir, tmp_path):
    cfg = _cfg(corpus_dir, tmp_path, strategy={"name": "prediction"})

    def fate(i: int, msg: Message) -> str | None:
        return (
            "error"
            if i == 1 and msg.metadata.message_type == p.PREDICT and p.job_of(msg).round == 2
            else None
        )

    run_dir = tmp_path / "run"
    assert _run_flower_in_process(cfg, run_dir, InProcessGrid(4, fate)) == "stopped"
    (fault,) = _records(run_dir, "fault")
    assert (fault["round"], fault["phase"], fault["client"]) == (2, "evidence", 1)
    assert "simulated ClientApp crash" in fault["reason"]
    stopped = _records(run_dir, "run")[-1]
    assert stopped["event"] == "stopped" and stopped["last_checkpoint"] == 1
    assert "min_clients is unset (needs 4)" in stopped["reason"]
    assert [r for r, _ in list_checkpoints(run_dir)] == [0, 1]
    assert len(_adapters(run_dir)) == 4  # round 1's adapters, complete and loadable
    with pytest.raises(FlowerRunError, match="stopped"):
        check_outcome(run_dir)
    assert is_flower_run(run_dir)


def test_a_missing_supernode_at_the_start_counts_against_min_clients(corpus_dir, tmp_path):
    cfg = _cfg(corpus_dir, tmp_path, federation={"clients": 4, "rounds": 1, "min_clients": 3})
    grid = InProcessGrid(4, lambda i, m: "silent" if i == 2 else None)
    settings = ServerSettings(connect_timeout=0, round_timeout=0.5)
    assert _run_flower_in_process(cfg, tmp_path / "run", grid, settings) == "completed"
    faults = _records(tmp_path / "run", "fault")
    assert [(f["round"], f["phase"]) for f in faults] == [(0, "connect")]
    assert {r["client"] for r in _records(tmp_path / "run", "eval")} == {0, 1, 3}


def test_two_supernodes_with_one_partition_id_are_refused(corpus_dir, tmp_path):
    cfg = _cfg(corpus_dir, tmp_path, federation={"clients": 2, "rounds": 1})
    grid = InProcessGrid(2)
    for ctx in grid.contexts.values():
        ctx.node_config["partition-id"] = 0
    with pytest.raises(ValueError, match="both have partition-id 0"):
        _run_flower_in_process(cfg, tmp_path / "run", grid)
    assert _records(tmp_path / "run", "run")[-1]["event"] == "failed"


def test_data_owners_can_bring_their_own_files(corpus_dir, tmp_path):
    cfg = _cfg(corpus_dir, tmp_path, federation={"clients": 2, "rounds": 1}, strategy={"name": "prediction"})

    def owners(public: bool) -> InProcessGrid:
        grid = InProcessGrid(2)
        for ctx, label in zip(grid.contexts.values(), ["alpha", "beta"], strict=True):
            ctx.node_config["data-path"] = str(corpus_dir / label)
            if public:  # prediction trust compares predictions on the same public files everywhere
                ctx.node_config["public-path"] = str(corpus_dir / "gamma")
        return grid

    assert _run_flower_in_process(cfg, tmp_path / "own", owners(public=True)) == "completed"
    assert len(_records(tmp_path / "own", "trust")) == 1
    assert _run_flower_in_process(cfg, tmp_path / "nopublic", owners(public=False)) == "stopped"
    assert all("public-path" in f["reason"] for f in _records(tmp_path / "nopublic", "fault"))


# ---- configuration -----------------------------------------------------------------------------------------
def test_node_settings_come_from_the_node_config(corpus_dir, tmp_path):
    cfg = _cfg(corpus_dir, tmp_path)
    with pytest.raises(ValueError, match="partition-id"):
        NodeSettings.from_node_config({})
    settings = NodeSettings.from_node_config({"partition-id": 1, "num-partitions": 3})
    with pytest.raises(ValueError, match="num-partitions=3"):
        node_config(dump_config(cfg), settings)
    with pytest.raises(ValueError, match="does not exist"):
        node_config(dump_config(cfg), NodeSettings(0, data_path=str(tmp_path / "nowhere")))
    own = NodeSettings(0, data_path=str(corpus_dir / "alpha"))
    assert node_config(dump_config(cfg), own).data.path == corpus_dir / "alpha"


def test_run_config_gives_the_experiment_and_a_fresh_run_dir(corpus_dir, tmp_path):
    cfg = _cfg(corpus_dir, tmp_path)
    text = dump_config(cfg)
    got = experiment_config({"config-yaml": text, "overrides": "federation.rounds=5 train.lr=0.5"})
    assert got.federation.rounds == 5 and got.train.lr == 0.5
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    assert experiment_config({"config": str(path)}).federation == cfg.federation
    with pytest.raises(ValueError, match="config-yaml"):
        experiment_config({})
    prepare_run_dir(tmp_path / "r", cfg)
    prepare_run_dir(tmp_path / "r", cfg)  # prepared by run_flower for this config: fine
    with pytest.raises(FileExistsError, match="another config"):
        prepare_run_dir(tmp_path / "r", got)
    (tmp_path / "r" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="already holds a run"):
        prepare_run_dir(tmp_path / "r", cfg)
    assert ServerSettings.from_config(cfg).round_timeout == 600.0
    two = with_run_settings(cfg, {"min-clients": 2, "round-timeout": 30})
    assert two.federation.min_clients == 2 and two.federation.client_timeout == 30.0
    assert ServerSettings.from_config(two).round_timeout == 30
    assert with_run_settings(cfg, {"min-clients": 0, "round-timeout": 0}) == cfg  # 0: the config's own


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # flwr's FAB builder uses a deprecated pathspec API
def test_the_flower_app_is_a_valid_fab_and_matches_pyproject(tmp_path):
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    app_dir = write_app_dir(tmp_path / "cotune-flower")
    config, _ = load_and_validate(app_dir / "pyproject.toml")
    assert config["tool"]["flwr"]["app"]["components"] == APP_COMPONENTS
    assert build_fab_from_disk(app_dir)
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flwr_app = repo["tool"]["flwr"]["app"]
    assert flwr_app["components"] == APP_COMPONENTS and flwr_app["config"] == APP_CONFIG
    assert any(d.startswith("flwr>=1.41,<1.42") for d in repo["project"]["optional-dependencies"]["flower"])


def test_outcome_reads_the_marker_line_of_a_remote_run(tmp_path):
    log = tmp_path / "flwr-run.log"
    remote = tmp_path / "elsewhere"
    log.write_text("noise\ncotune-outcome: " + json.dumps({"event": "end", "run_dir": str(remote)}) + "\n")
    check_outcome(remote, log)
    with pytest.raises(FlowerRunError, match="did not complete"):
        check_outcome(tmp_path / "other", log)


# ---- FedCoLLM ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("algorithm", "ffa"), [("fedcollm", False), ("fedavg", False), ("standalone", False), ("fedcollm", True)]
)
def test_fedcollm_family_on_flower_gives_the_embedded_results_bit_for_bit(
    task_file,  # noqa: F811
    tmp_path,
    algorithm,
    ffa,
    node_state_in_tmp,
):
    cfg = config_from_dict(
        tree(task_file, tmp_path, algorithm, run={"threads": 1}, federation={"ffa_lora": ffa})
    )
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    grid = InProcessGrid(cfg.federation.clients)
    assert _run_flower_in_process(cfg, tmp_path / "flower", grid) == "completed"
    flower = tmp_path / "flower"
    # every adapter: the clients' SLM LoRA, the server's theta and (fedcollm) the LLM's omega
    ours, theirs = _adapters(embedded, pattern="*"), _adapters(flower, pattern="*")
    assert set(ours) >= {"client-00", "server"} and ("server-llm" in ours) == (algorithm == "fedcollm")
    assert max_adapter_diff(ours, theirs) == 0.0
    for kind, keys in [
        ("mc", ("round", "model", "client", "acc", "acc_norm")),
        ("train", ("round", "client", "loss", "lr")),
        ("distill", ("round", "slm_kd", "llm_kd")),
        ("comm", ("round", "client", "bytes_up", "bytes_down")),
    ]:
        rows = [[{k: r[k] for k in keys} for r in _records(d, kind)] for d in (embedded, flower)]
        assert rows[0] == rows[1], kind
    # only training travels: one describe and one train message per client and round, no LLM anywhere
    assert sorted({t for _, t in grid.sent}) == [p.DESCRIBE, p.TRAIN]
    assert sum(t == p.TRAIN for _, t in grid.sent) == cfg.federation.clients * cfg.federation.rounds
    for i in range(cfg.federation.clients):  # what each node keeps: its SLM adapter, nothing of the server's
        saved = torch.load(node_states(node_state_in_tmp, i)[-1], weights_only=True)
        assert saved["adapter"].keys() == ours["client-00"].keys()


@pytest.mark.slow
def test_fedcollm_across_tokenizers_on_flower_gives_the_embedded_results_bit_for_bit(
    task_file,  # noqa: F811
    tmp_path,
    node_state_in_tmp,
    monkeypatch,
):
    """An LLM of another tokenizer lives in the ServerApp only: the nodes train the SLM as ever, and the
    server's distillation across tokenizers gives the embedded adapters and alignment figures."""
    monkeypatch.setenv("COTUNE_CACHE", str(tmp_path / "cache"))  # the vocabulary map's cache
    t = tree(task_file, tmp_path, "fedcollm", run={"threads": 1})
    t["llm"]["model"]["tiny"]["tokenizer"] = "merges"
    cfg = config_from_dict(t)
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    grid = InProcessGrid(cfg.federation.clients)
    assert _run_flower_in_process(cfg, tmp_path / "flower", grid) == "completed"
    flower = tmp_path / "flower"
    ours, theirs = _adapters(embedded, pattern="*"), _adapters(flower, pattern="*")
    assert "server-llm" in ours and max_adapter_diff(ours, theirs) == 0.0
    keys = ("round", "model", "positions", "exact_share", "carried_share", "unmatched_share")
    rows = [[{k: r[k] for k in keys} for r in _records(d, "align")] for d in (embedded, flower)]
    assert rows[0] and rows[0] == rows[1]
    assert sorted({t for _, t in grid.sent}) == [p.DESCRIBE, p.TRAIN]


def test_fedcollm_nodes_hold_the_slm_only_and_refuse_other_payloads(task_file, tmp_path):  # noqa: F811
    from cotune.runtime.flower.node import Node, NodeSettings

    cfg = config_from_dict(tree(task_file, tmp_path, "fedcollm", run={"threads": 1}))
    node = Node("fedcollm", cfg, NodeSettings(1, 3))
    assert node.pool.names == ["client-01"]  # its own SLM adapter: no server slot, no LLM
    assert node.pool.model.config.hidden_size == cfg.model.tiny.hidden_size != cfg.llm.model.tiny.hidden_size
    assert node.work.describe().examples == len(node.task_data) > 0
    wrong = {k: torch.zeros(*v[:-1], v[-1] + 1) for k, v in node.shapes.items()}
    with pytest.raises(ValueError, match="not exactly the SLM adapter"):
        node.adopt(wrong)


def test_a_fedcollm_client_that_fails_is_dropped_and_fedavg_uses_the_others(task_file, tmp_path):  # noqa: F811
    cfg = config_from_dict(tree(task_file, tmp_path, "fedavg", run={"threads": 1}))

    def fate(i: int, msg: Message) -> str | None:
        return (
            "error" if i == 2 and msg.metadata.message_type == p.TRAIN and p.job_of(msg).round == 2 else None
        )

    run_dir = tmp_path / "run"
    two = with_run_settings(cfg, {"min-clients": 2})  # federation.min_clients = 2, as run_flower sets it
    assert _run_flower_in_process(two, run_dir, InProcessGrid(3, fate)) == "completed"
    (fault,) = _records(run_dir, "fault")
    assert (fault["round"], fault["phase"], fault["client"]) == (2, "train", 2)
    assert [r["client"] for r in _records(run_dir, "comm") if r["round"] == 2] == [0, 1]
    # with min_clients = all, the same failure stops the run after round 1, checkpoint intact
    stop_dir = tmp_path / "stop"
    assert _run_flower_in_process(cfg, stop_dir, InProcessGrid(3, fate)) == "stopped"
    assert [r for r, _ in list_checkpoints(stop_dir)] == [0, 1] and is_flower_run(stop_dir)


def test_server_only_algorithms_are_not_sent_to_supernodes(task_file, tmp_path):  # noqa: F811
    for algorithm in ("centralized", "zero_shot"):
        cfg = config_from_dict(tree(task_file, tmp_path, algorithm))
        with pytest.raises(ValueError, match="no client step"):
            run_server(cfg, tmp_path / "x", InProcessGrid(3))


# ---- the command line ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_backend_flower_runs_reports_and_resumes_on_flower(corpus_dir, tmp_path, monkeypatch):
    """`cotune run CONFIG --backend flower`: the CLI hands the config to run_flower, whose federation is
    replaced by the in-process grid here (the real processes: tests/integration/test_flower_local.py)."""
    import yaml
    from typer.testing import CliRunner

    import cotune.runtime.flower.deploy as deploy
    from cotune.cli.main import app

    calls = []

    def fake_run_on_flower(runs, console, **kwargs):
        calls.append(kwargs)
        for run_dir, cfg in runs:
            grid = InProcessGrid(cfg.federation.clients)
            settings = ServerSettings.from_config(cfg)
            run_server(cfg, run_dir, grid, settings, say=lambda s: None, resume=kwargs.get("resume", False))
            check_outcome(run_dir)

    monkeypatch.setattr(deploy, "run_on_flower", fake_run_on_flower)
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_tree(corpus_dir, tmp_path, federation={"rounds": 1})))
    out = tmp_path / "run"
    runner = CliRunner()
    args = ["run", str(cfg_path), "--out", str(out), "--backend", "flower", "--superlink", "10.0.0.1:8000"]
    result = runner.invoke(app, [*args, "--root-certificates", str(cfg_path)])
    assert result.exit_code == 0, result.output
    given = {"superlink": "10.0.0.1:8000", "root_certificates": cfg_path, "connect_timeout": 120.0}
    assert calls == [{**given, "timeout": None, "resume": False}]
    assert (out / "report.md").is_file() and is_flower_run(out)

    def said(result) -> str:  # rich wraps long lines
        return " ".join(result.output.split())

    calls.clear()  # a Flower run resumes on Flower, with the options given
    shutil.rmtree(out / "checkpoints" / "round-0001")  # as if the run died during round 1
    result = runner.invoke(app, ["run", "--resume", str(out), "--superlink", "10.0.0.1:8000"])
    assert result.exit_code == 0, result.output
    assert calls == [{**given, "root_certificates": None, "timeout": None, "resume": True}]

    def stopped(runs, console, **kwargs):
        raise FlowerRunError(
            f"{runs[0][0]}: the run stopped: 1 of 2 clients left; last complete checkpoint: 0"
        )

    monkeypatch.setattr(deploy, "run_on_flower", stopped)
    result = runner.invoke(app, ["run", str(cfg_path), "--out", str(tmp_path / "x"), "--backend", "flower"])
    assert result.exit_code == 2 and "the run stopped" in said(result)
    result = runner.invoke(app, ["run", str(cfg_path), "--backend", "nope"])
    assert result.exit_code == 2 and "unknown --backend" in said(result)
    result = runner.invoke(app, ["run", str(cfg_path), "--superlink", "h:1"])
    assert result.exit_code == 2 and "--superlink needs --backend flower" in said(result)
    result = runner.invoke(app, ["run", str(cfg_path), "--backend", "flower", "--client-cpus", "2"])
    assert result.exit_code == 2 and "--client-cpus needs --backend flower-simulation" in said(result)


def test_run_flower_without_flwr_says_how_to_install(monkeypatch, corpus_dir, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a)
    )
    with pytest.raises(FlowerRunError, match=r"pip install -e '\.\[flower\]'"):
        run_experiment(_cfg(corpus_dir, tmp_path), tmp_path / "r", backend="flower")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_client_dropped_from_one_round_is_asked_again_in_the_next(corpus_dir, tmp_path):
    """federation.client_timeout on Flower: no reply in time drops the client from that round only."""
    cfg = _cfg(
        corpus_dir,
        tmp_path,
        strategy={"name": "validation"},
        federation={"min_clients": 3, "client_timeout": 5},
    )
    assert ServerSettings.from_config(cfg).round_timeout == 5.0

    def fate(i: int, msg: Message) -> str | None:
        return (
            "silent" if i == 3 and p.job_of(msg).round == 1 and msg.metadata.message_type == p.TRAIN else None
        )

    run_dir = tmp_path / "run"
    assert _run_flower_in_process(cfg, run_dir, InProcessGrid(4, fate)) == "completed"
    (fault,) = _records(run_dir, "fault")
    assert (fault["round"], fault["phase"], fault["client"], fault["event"]) == (
        1,
        "train",
        3,
        "client_dropped",
    )
    assert [r["participants"] for r in _records(run_dir, "trust")] == [[0, 1, 2], [0, 1, 2, 3]]
    assert [r["participants"] for r in _records(run_dir, "round")] == [[0, 1, 2], [0, 1, 2, 3]]


# ---- SecAgg+ ---------------------------------------------------------------------------------------------
# SecAgg+ quantizes values to steps of 16 / 2**22 ~ 3.8e-6 (stochastic rounding), the weights likewise:
# with equal weights the secure mean is within one step of the plain one.
SECAGG_TOLERANCE = 1e-5


@pytest.mark.parametrize("algorithm", ["fedavg", "fedcollm"])
def test_secure_aggregation_gives_the_plain_weighted_mean(task_file, tmp_path, algorithm):  # noqa: F811
    tree_ = tree(task_file, tmp_path, algorithm, run={"threads": 1}, federation={"rounds": 1})
    plain = config_from_dict(tree_)
    secure = config_from_dict({**tree_, "federation": {**tree_["federation"], "secure_aggregation": True}})
    (embedded,) = run_experiment(plain, tmp_path / "embedded")
    grid = InProcessGrid(plain.federation.clients)
    assert _run_flower_in_process(secure, tmp_path / "flower", grid) == "completed"
    ours, theirs = _adapters(embedded, pattern="*"), _adapters(tmp_path / "flower", pattern="*")
    diff = max_adapter_diff({"s": ours["server"]}, {"s": theirs["server"]})
    print(f"\nSecAgg+ {algorithm}: max |secure - plain| server adapter = {diff:.3g}")
    # quantized (stochastic rounding), so not bit-exact, but the same weighted mean: fedavg's server
    # adapter is the mean itself; fedcollm's has been distilled from it since (a few AdamW steps)
    assert 0 < diff <= (SECAGG_TOLERANCE if algorithm == "fedavg" else 5 * SECAGG_TOLERANCE)
    if algorithm == "fedcollm":
        assert max_adapter_diff({"l": ours["server-llm"]}, {"l": theirs["server-llm"]}) <= 1e-4
    # four SecAgg+ stages per round; the nodes' masked uploads carry no adapter in the clear
    assert sum(t == p.TRAIN for _, t in grid.sent) == 4 * plain.federation.clients
    collected = [m for m in grid.replies if "fitres.parameters" in m.content.array_records]
    assert len(collected) == plain.federation.clients
    assert all(len(m.content.array_records["fitres.parameters"]) == 0 for m in collected)
    assert [r["client"] for r in _records(tmp_path / "flower", "train")] == [0, 1, 2]


def test_secure_aggregation_is_refused_where_it_cannot_apply(task_file, corpus_dir, tmp_path):  # noqa: F811
    standalone = config_from_dict(
        tree(task_file, tmp_path, "standalone", federation={"secure_aggregation": True})
    )
    with pytest.raises(FlowerRunError, match="secure_aggregation is implemented for"):
        run_server(standalone, tmp_path / "x", InProcessGrid(3))
    with pytest.raises(FlowerRunError, match="secure_aggregation is implemented for"):
        run_experiment(standalone, tmp_path / "never", backend="flower")  # refused before any process starts
    assert not (tmp_path / "never").exists()
    personalized = _cfg(corpus_dir, tmp_path, federation={"secure_aggregation": True})
    with pytest.raises(FlowerRunError, match="secure_aggregation is implemented for"):
        run_server(personalized, tmp_path / "x", InProcessGrid(4))
    screened = config_from_dict(
        tree(
            task_file,
            tmp_path,
            "fedavg",
            federation={"secure_aggregation": True},
            robustness={"max_update_norm": 1.0},
        )
    )
    with pytest.raises(FlowerRunError, match="cannot be screened"):
        run_server(screened, tmp_path / "x", InProcessGrid(3))


def test_fedcollm_data_owners_can_bring_their_own_task_file(task_file, tmp_path):  # noqa: F811
    cfg = config_from_dict(tree(task_file, tmp_path, "fedavg", run={"threads": 1}, federation={"rounds": 1}))
    grid = InProcessGrid(3)
    for ctx in grid.contexts.values():
        ctx.node_config["data-path"] = str(task_file)  # all of it is this node's private set D_k
    clients = FlowerClients(cfg, grid, "fedcollm", say=lambda s: None)
    described = clients.describe()
    # n_k as the nodes report them, not the config's split
    assert {i: info.examples for i, info in described.ok.items()} == {0: 90, 1: 90, 2: 90}
    assert _run_flower_in_process(cfg, tmp_path / "run", grid) == "completed"
    assert len(_records(tmp_path / "run", "comm")) == 3
    # claims the server cannot check: no bound given, so FedAvg weighs every client the same, said
    claims = [r for r in _records(tmp_path / "run", "fault") if r["event"] == "claim_rejected"]
    assert [r["client"] for r in claims] == [0, 1, 2] and "weighs uniformly" in claims[0]["reason"]


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_a_node_claiming_a_billion_examples_does_not_take_over_fedavg(task_file, tmp_path, secure):  # noqa: F811
    cfg = config_from_dict(
        tree(task_file, tmp_path, "fedavg", run={"threads": 1}, federation={"secure_aggregation": secure})
    )
    honest = tmp_path / "honest"
    assert _run_flower_in_process(cfg, honest, InProcessGrid(3)) == "completed"

    def liar(i: int, msg: Message) -> str | None:
        return "claims a billion" if i == 1 and msg.metadata.message_type == p.DESCRIBE else None

    run_dir = tmp_path / "lied"
    assert _run_flower_in_process(cfg, run_dir, InProcessGrid(3, liar)) == "completed"
    (claim,) = [r for r in _records(run_dir, "fault") if r["event"] == "claim_rejected"]
    assert claim["client"] == 1 and claim["reason"].startswith("claimed 1000000000 examples")
    assert max_adapter_diff(_adapters(honest, pattern="*"), _adapters(run_dir, pattern="*")) == 0.0


def test_claims_of_nodes_with_their_own_data_are_capped_at_max_examples(task_file, tmp_path):  # noqa: F811
    from cotune.runtime.claims import checked_sizes

    cfg = config_from_dict(tree(task_file, tmp_path, "fedavg", federation={"max_examples": 50}))
    logged = []
    infos = {
        0: ClientInfo(0, "cpu", examples=30),
        1: ClientInfo(1, "cpu", examples=10**9, own_data=True),
        2: ClientInfo(2, "cpu", examples=40, own_data=True),
    }
    assert checked_sizes(cfg, infos, [30, 30, 30], logged.append) == [30, 50, 40]
    assert [(r.client, r.event) for r in logged] == [(1, "claim_rejected")]


@pytest.mark.parametrize("strategy", ["validation", "prediction", "flora", "fedex_lora"])
def test_partial_participation_on_flower_gives_the_embedded_results(corpus_dir, tmp_path, strategy):
    cfg = _cfg(
        corpus_dir, tmp_path, strategy={"name": strategy}, federation={"rounds": 3, "clients_per_round": 2}
    )
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    grid = InProcessGrid(cfg.federation.clients)
    assert _run_flower_in_process(cfg, tmp_path / "flower", grid) == "completed"
    assert max_adapter_diff(_adapters(embedded), _adapters(tmp_path / "flower")) == 0.0
    trained = [(r["round"], r["client"]) for r in _records(tmp_path / "flower", "train")]
    assert len(trained) == 3 * 2 and trained == [
        (r["round"], r["client"]) for r in _records(embedded, "train")
    ]


def test_a_long_lived_node_process_loads_the_base_model_once(corpus_dir, tmp_path, monkeypatch):
    """What a simulation actor gains: every message reuses the process's base model (unwrapped after) and
    its prepared data split."""
    import cotune.runtime.flower.node as node_module

    calls, splits = [], []
    real, real_split = node_module.load_model, node_module.client_data
    monkeypatch.setattr(node_module, "load_model", lambda cfg: calls.append(1) or real(cfg))
    monkeypatch.setattr(node_module, "client_data", lambda *a: splits.append(1) or real_split(*a))
    node_module.BASES.clear()
    node_module.PREPARED.clear()
    cfg = _cfg(corpus_dir, tmp_path, strategy={"name": "validation"})
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    grid = InProcessGrid(cfg.federation.clients)
    assert _run_flower_in_process(cfg, tmp_path / "flower", grid) == "completed"
    assert len(calls) == 1 and len(grid.sent) > 20  # one load for every message of every node
    assert len(splits) == 1  # and one corpus split for all of them
    assert max_adapter_diff(_adapters(embedded), _adapters(tmp_path / "flower")) == 0.0


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora", "validation"])
@pytest.mark.slow
def test_clients_of_different_ranks_give_the_embedded_results_on_flower(corpus_dir, tmp_path, strategy):
    """Each SuperNode builds its client at its own rank from the same widest initialisation; the adapters,
    trust matrices and per-client traffic match the embedded run's."""
    cfg = _cfg(corpus_dir, tmp_path, strategy={"name": strategy}, lora={"ranks": [1, 2, 3, 4]})
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    flower = tmp_path / "flower"
    assert _run_flower_in_process(cfg, flower, InProcessGrid(cfg.federation.clients)) == "completed"
    final = _adapters(flower)
    assert [next(v for k, v in final[c].items() if "lora_A" in k).shape[0] for c in sorted(final)] == [
        1,
        2,
        3,
        4,
    ]
    assert max_adapter_diff(_adapters(embedded), final) == 0.0
    for kind in ("trust", "comm"):
        strip = [
            [{k: v for k, v in r.items() if k != "time"} for r in _records(d, kind)]
            for d in (embedded, flower)
        ]
        assert strip[0] == strip[1] and strip[0]


@pytest.mark.slow
def test_flora_on_flower_gives_the_embedded_results_sends_each_node_what_it_lacks_and_resumes(
    corpus_dir, tmp_path
):
    """Each node merges FLoRA's history into its own base: adapters, trust and traffic as embedded; a message
    brings only the components the node does not hold yet; a resumed run (fresh node memory) too."""
    cfg = _cfg(
        corpus_dir,
        tmp_path,
        strategy={"name": "flora"},
        lora={"ranks": [1, 2, 3, 4]},
        federation={"rounds": 3},
    )
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    brought: list[tuple[int, str, int]] = []

    def watch(i: int, msg: Message) -> None:
        if p.BASE in msg.content.array_records:
            base = p.record_to_tensors(msg.content.array_records[p.BASE])
            brought.append((p.job_of(msg).round, msg.metadata.message_type, rank_of(base)))

    flower = tmp_path / "flower"
    assert _run_flower_in_process(cfg, flower, InProcessGrid(4, watch)) == "completed"
    assert max_adapter_diff(_adapters(embedded), _adapters(flower)) == 0.0
    for kind in ("trust", "comm", "eval"):
        strip = [
            [{k: v for k, v in r.items() if k != "time"} for r in _records(d, kind)]
            for d in (embedded, flower)
        ]
        assert strip[0] == strip[1] and strip[0]
    # round r's update (rank 10) travels once per node, with its evaluate message; never the whole history
    assert brought == [(r, p.EVALUATE, 10) for r in (1, 2, 3) for _ in range(4)]

    resumed = tmp_path / "resumed"
    with pytest.raises(ServerKilled):
        _run_flower_in_process(cfg, resumed, InProcessGrid(4, _killed_in_round(3)))
    assert _resume_in_process(cfg, resumed, InProcessGrid(4, run_id=8)) == "completed"
    assert max_adapter_diff(_adapters(embedded), _adapters(resumed)) == 0.0


def test_a_node_that_lost_floras_merged_update_is_dropped_then_sent_all_of_it(
    corpus_dir, tmp_path, node_state_in_tmp
):
    """Its training in that round fails with a clear reason; the server then sends it the whole update, and it
    trains again in the next round."""
    cfg = _cfg(corpus_dir, tmp_path, strategy={"name": "flora"}, federation={"rounds": 4, "min_clients": 3})

    def lose(i: int, msg: Message) -> None:
        if i == 2 and p.job_of(msg).round == 3 and msg.metadata.message_type == p.TRAIN:
            for saved in node_state_in_tmp.glob("cotune/nodes/*/client-2/merged-base.pt"):
                saved.unlink()

    run_dir = tmp_path / "flower"
    assert _run_flower_in_process(cfg, run_dir, InProcessGrid(4, lose)) == "completed"
    (fault,) = _records(run_dir, "fault")
    assert (fault["round"], fault["client"]) == (3, 2) and "lost the first" in fault["reason"]
    assert [t["client"] for t in _records(run_dir, "train") if t["round"] == 4] == [0, 1, 2, 3]


class SlowGrid(InProcessGrid):
    """Replies become available `delay` seconds after the push (a SuperNode's work and delivery)."""

    def __init__(self, delay: float, silent: int = 0) -> None:
        super().__init__(0)
        self.delay, self.silent, self.pushed_at = delay, silent, 0.0

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        self.pushed_at = time.monotonic()
        return [f"m{k}" for k, _ in enumerate(messages)]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        if time.monotonic() - self.pushed_at < self.delay:
            return []
        answered = sorted(message_ids)[: max(0, len(list(message_ids)) - self.silent)]
        replies = [Message(RecordDict(), dst_node_id=1, message_type=p.TRAIN) for _ in answered]
        for reply, i in zip(replies, answered, strict=True):
            reply.metadata.__dict__["_reply_to_message_id"] = i
        return replies


def test_the_server_asks_for_replies_often_and_stops_at_the_timeout(corpus_dir, tmp_path):
    """Flower's Grid.send_and_receive asks every 3 s; the server's own loop every poll_interval."""
    cfg = _cfg(corpus_dir, tmp_path)
    messages = [Message(RecordDict(), dst_node_id=1, message_type=p.TRAIN) for _ in range(3)]
    clients = FlowerClients(cfg, SlowGrid(0.3), "personalized", ServerSettings(round_timeout=10))
    t0 = time.monotonic()
    assert len(clients.send_and_receive(messages)) == 3
    assert time.monotonic() - t0 < 1.5  # answered at 0.3 s, seen within one 0.2 s poll
    clients = FlowerClients(cfg, SlowGrid(0.0, silent=1), "personalized", ServerSettings(round_timeout=0.6))
    t0 = time.monotonic()
    assert len(clients.send_and_receive(messages)) == 2  # one node never answers: the timeout ends it
    assert 0.6 <= time.monotonic() - t0 < 2.0


# ---- the node worker (one long-lived process per SuperNode) ----------------------------------------------
@pytest.fixture
def node_worker(tmp_path):
    """A node worker serving the real node app from a thread; yields its socket path."""
    path = tmp_path / "sock" / "worker.sock"
    logged: list[str] = []
    worker = NodeWorker(path, node_app, log=logged.append)
    thread = threading.Thread(target=worker.serve_forever, daemon=True)
    thread.start()
    yield path
    worker.stop()
    thread.join(timeout=10)
    assert not thread.is_alive() and not path.exists()
    assert all("refused" not in line for line in logged)


@pytest.mark.parametrize("strategy", ["validation", "prediction"])
@pytest.mark.slow
def test_a_node_worker_gives_the_same_results_bit_for_bit(corpus_dir, tmp_path, strategy, node_worker):
    cfg = _cfg(corpus_dir, tmp_path, strategy={"name": strategy})
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    grid = InProcessGrid(cfg.federation.clients, worker=node_worker)
    assert _run_flower_in_process(cfg, tmp_path / "flower", grid) == "completed"
    assert max_adapter_diff(_adapters(embedded), _adapters(tmp_path / "flower")) == 0.0
    assert [r["matrix"] for r in _records(embedded, "trust")] == [
        r["matrix"] for r in _records(tmp_path / "flower", "trust")
    ]


def test_secure_aggregation_keeps_its_node_state_through_a_node_worker(task_file, tmp_path, node_worker):  # noqa: F811
    """SecAgg+ keeps each node's protocol state in the Flower Context between its four stages: the
    worker must hand the updated state back, or stage 2 onwards fails."""
    tree_ = tree(task_file, tmp_path, "fedavg", run={"threads": 1}, federation={"rounds": 1})
    secure = config_from_dict({**tree_, "federation": {**tree_["federation"], "secure_aggregation": True}})
    direct, via = tmp_path / "direct", tmp_path / "via"
    assert _run_flower_in_process(secure, direct, InProcessGrid(3)) == "completed"
    grid = InProcessGrid(3, worker=node_worker)
    assert _run_flower_in_process(secure, via, grid) == "completed"
    assert all(len(ctx.state) for ctx in grid.contexts.values())  # SecAgg+ state came back
    assert [r["client"] for r in _records(via, "train")] == [0, 1, 2]
    ours, theirs = _adapters(direct, pattern="*"), _adapters(via, pattern="*")
    assert max_adapter_diff({"s": ours["server"]}, {"s": theirs["server"]}) <= SECAGG_TOLERANCE


def test_a_node_worker_reports_failures_and_absence_with_what_to_do(corpus_dir, tmp_path, node_worker):
    cfg = _cfg(corpus_dir, tmp_path)
    grid = InProcessGrid(cfg.federation.clients, worker=node_worker)
    ctx = next(iter(grid.contexts.values()))
    bad = Message(RecordDict(), dst_node_id=ctx.node_id, message_type=p.TRAIN)  # no job record
    with pytest.raises(WorkerError, match=r"ValueError: message 'train' has no 'cotune\.job' record"):
        forward(str(node_worker), bad, ctx)
    with pytest.raises(WorkerError, match=r"no cotune node worker answers .*cotune flower worker --socket"):
        forward(str(tmp_path / "nobody.sock"), bad, ctx)
    garbage = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # not Flower's frames: answered by a
    garbage.connect(str(node_worker))  # closed connection, and the worker goes on
    garbage.sendall((5).to_bytes(8, "big") + b"\xff\xfe\x00\x01\x02" + (3).to_bytes(8, "big") + b"abc")
    assert garbage.recv(16) == b""
    garbage.close()
    with pytest.raises(WorkerError, match="has no 'cotune"):
        forward(str(node_worker), bad, ctx)


def test_a_stuck_node_worker_fails_the_message_within_the_timeout_not_never(tmp_path):
    """A worker that accepts and never answers: the ClientApp's side gives up after its reply timeout
    (worker-timeout= of the node config) with a reason that says what to do."""
    path = tmp_path / "stuck.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True).start()
    ctx = next(iter(InProcessGrid(1).contexts.values()))
    ctx.node_config["worker-timeout"] = 0.5
    msg = Message(RecordDict(), dst_node_id=ctx.node_id, message_type=p.TRAIN)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"did not reply within 0\.5s .*raise worker-timeout="):
        forward(str(path), msg, ctx)
    assert time.monotonic() - t0 < 5
    ctx.node_config["worker-timeout"] = "soon"
    with pytest.raises(WorkerError, match=r"worker-timeout .* must be seconds > 0"):
        forward(str(path), msg, ctx)
    server.close()
    for conn in held:
        conn.close()


def test_a_client_that_never_sends_does_not_hold_the_node_worker(tmp_path):
    """The worker drops a connection whose request does not come within its I/O timeout and serves the
    next message."""
    path = tmp_path / "sock" / "w.sock"
    logged: list[str] = []
    worker = NodeWorker(
        path, lambda m, c: Message(RecordDict(), reply_to=m), log=logged.append, io_timeout=0.3
    )
    thread = threading.Thread(target=worker.serve_forever, daemon=True)
    thread.start()
    try:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(str(path))  # and sends nothing
        grid = InProcessGrid(1)
        ctx = next(iter(grid.contexts.values()))
        msg = Message(RecordDict(), dst_node_id=ctx.node_id, message_type=p.TRAIN)
        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        t0 = time.monotonic()
        reply = forward(str(path), msg, ctx, timeout=10)
        assert reply.metadata.reply_to_message_id == msg.metadata.message_id
        assert time.monotonic() - t0 < 5
        assert any("no complete request or reply within 0.3s" in line for line in logged)
        silent.close()
    finally:
        worker.stop()
        thread.join(timeout=10)


def test_a_node_worker_never_replaces_a_file_or_a_live_worker(tmp_path, node_worker):
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a socket"):
        NodeWorker(precious, node_app)
    assert precious.read_text() == "mine"
    with pytest.raises(ValueError, match="a worker already listens"):
        NodeWorker(node_worker, node_app)
    with pytest.raises(ValueError, match="a Unix socket path may have at most 107"):
        NodeWorker(tmp_path / ("x" * 120) / "w.sock", node_app)
    stale = tmp_path / "stale.sock"  # a stopped worker's socket file: taken over
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))
    dead.close()
    worker = NodeWorker(stale, node_app, log=lambda line: None)
    assert oct(stale.stat().st_mode & 0o777) == "0o600"  # only this user may connect
    worker.stop()
    worker.serve_forever()  # returns at once: stopped; removes its socket
    assert not stale.exists()


def test_the_clientapp_imports_no_torch_when_a_worker_does_the_work():
    """What makes a message cheap: Flower's per-message process imports only Flower and this module."""
    code = "import sys, cotune.runtime.flower.client_app; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_cli_worker_refuses_a_path_that_is_not_a_socket_before_its_heavy_imports(tmp_path):
    """The refusal comes at once: the worker listens (checking the path) before it imports torch."""
    precious = tmp_path / "data.csv"
    precious.write_text("a,b\n")
    code = (
        "import sys\nfrom cotune.cli.main import cli\ntry:\n"
        f"    cli(['flower', 'worker', '--socket', {str(precious)!r}])\n"
        "finally:\n    print('torch imported:', 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2 and "error:" in done.stderr and "not a socket" in done.stderr
    assert "torch imported: False" in done.stdout, done.stdout
    assert precious.read_text() == "a,b\n"


def test_a_message_sent_while_the_worker_loads_its_app_waits_and_is_answered(tmp_path):
    """run_worker listens before it loads the app: a ClientApp that connects during the imports is
    answered once they are done; an app that fails to load leaves no socket behind."""
    path = tmp_path / "w.sock"
    loading, reply = threading.Event(), {}

    def slow_app() -> Callable[[Message, Context], Message]:
        loading.set()
        time.sleep(0.5)  # the imports
        return lambda message, context: Message(RecordDict(), reply_to=message)

    ctx = next(iter(InProcessGrid(1).contexts.values()))
    msg = Message(RecordDict(), dst_node_id=ctx.node_id, message_type=p.TRAIN)
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex

    def ask_then_stop() -> None:
        try:
            assert loading.wait(10)  # the worker listens and is loading its app: the message waits for it
            reply["got"] = forward(str(path), msg, ctx, timeout=10)
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # the worker's Ctrl-C (also when the above failed)

    asker = threading.Thread(target=ask_then_stop)
    asker.start()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_worker(path, slow_app)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        asker.join(10)
    assert reply["got"].metadata.reply_to_message_id == msg.metadata.message_id and not path.exists()

    def broken() -> Callable[[Message, Context], Message]:
        raise ImportError("no torch")

    with pytest.raises(ImportError):
        run_worker(path, broken)
    assert not path.exists()


# ---- why a Flower run did not complete: the cause in the CLI's error, with what to do ------------------
def _cli_run(*args: str):
    from typer.testing import CliRunner

    from cotune.cli.main import app

    result = CliRunner().invoke(app, ["run", *args])
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


def _config_file(corpus_dir: Path, tmp_path: Path, **sections) -> Path:
    import yaml

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_tree(corpus_dir, tmp_path, run={"threads": 1}, **sections)))
    return path


def _serve(handle: Callable[[socket.socket], None]) -> int:
    """A TCP server on 127.0.0.1 that hands each connection to `handle`; returns its port."""
    server = socket.create_server(("127.0.0.1", 0))

    def loop() -> None:
        while True:
            conn, _ = server.accept()
            with conn, contextlib.suppress(OSError):
                handle(conn)

    threading.Thread(target=loop, daemon=True).start()
    return int(server.getsockname()[1])


def test_an_unreachable_superlink_is_named_as_such_at_once(corpus_dir, tmp_path):
    from cotune.runtime.flower.federation import free_port

    cfg = _config_file(corpus_dir, tmp_path)
    closed = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    code, said = _cli_run(
        str(cfg), "--out", str(tmp_path / "r"), "--backend", "flower", "--superlink", closed
    )
    assert code == 2 and f"error: --superlink {closed}: connection refused" in said, said
    assert "start the SuperLink" in said and "did not complete" not in said
    assert time.monotonic() - t0 < 30 and not (tmp_path / "r").exists()
    code, said = _cli_run(str(cfg), "--backend", "flower", "--superlink", "no-port-here")
    assert code == 2 and "is not HOST:PORT" in said


def test_a_wrong_ca_certificate_is_named_as_such(corpus_dir, tmp_path):
    """A SuperLink serving TLS with a certificate of one CA; the user gives another CA (or a non-TLS
    SuperLink gets a CA): the error says which, before anything is submitted."""
    import ssl

    from cotune.runtime.flower.pki import make_server_files

    theirs, wrong = make_server_files(tmp_path / "pki"), make_server_files(tmp_path / "other-pki")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(theirs.cert, theirs.key)
    port = _serve(lambda conn: tls.wrap_socket(conn, server_side=True).close())
    cfg = _config_file(corpus_dir, tmp_path)
    args = [str(cfg), "--out", str(tmp_path / "r"), "--backend", "flower", "--superlink", f"127.0.0.1:{port}"]
    code, said = _cli_run(*args, "--root-certificates", str(wrong.ca))
    assert code == 2 and "TLS certificate does not verify against --root-certificates" in said, said
    assert "give the CA that signed the SuperLink's certificate" in said
    code, said = _cli_run(*args, "--root-certificates", str(theirs.key))  # not a certificate at all
    assert code == 2 and "not a readable PEM CA certificate" in said, said
    plain = _serve(lambda conn: (conn.recv(64), conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")))
    args[-1] = f"127.0.0.1:{plain}"
    code, said = _cli_run(*args, "--root-certificates", str(theirs.ca))
    assert code == 2 and "no TLS handshake" in said and "--insecure" in said, said


def test_what_flwr_run_logged_is_named_when_the_run_never_started(tmp_path):
    from cotune.runtime.flower.outcome import FLWR_AUTH_FAILED, FLWR_UNAVAILABLE

    log = tmp_path / "flwr-run.log"
    for mark, cause in [
        (FLWR_UNAVAILABLE, "could not reach the SuperLink"),
        (FLWR_AUTH_FAILED, "flwr login"),
    ]:
        log.write_text(f"Using SuperLink: cotune (10.0.0.1:8000)\n│ {mark}. Please check │\n")
        with pytest.raises(FlowerRunError, match=f"did not complete the run: .*{cause}.*log: {log}"):
            check_outcome(tmp_path / "run", log)
    log.write_text("something else\n")
    with pytest.raises(FlowerRunError, match=r"did not complete the run \(log: "):
        check_outcome(tmp_path / "run", log)


class PartialGrid(InProcessGrid):
    """Only some SuperNodes ever connect (the others not started, not registered, or without the CA)."""

    def __init__(self, n_nodes: int, joined: set[int], fate: Fate | None = None) -> None:
        super().__init__(n_nodes, fate)
        self.joined = joined

    def get_node_ids(self) -> Iterable[int]:
        return [n for n, c in self.contexts.items() if int(c.node_config["partition-id"]) in self.joined]


@pytest.mark.parametrize(
    ("grid", "settings", "cause"),
    [
        (
            lambda: PartialGrid(2, {0}),
            ServerSettings(connect_timeout=0.2),
            r"client\(s\) 1 not joined: .*"
            r"not registered \(`flwr supernode register KEY\.pub`.*raise --connect-timeout",
        ),
        (
            lambda: InProcessGrid(2, lambda i, m: "gone" if i == 1 and p.job_of(m).round == 1 else None),
            None,
            r"client\(s\) 1 lost: the SuperLink reports the SuperNode gone",
        ),
        (
            lambda: InProcessGrid(2, lambda i, m: "silent" if i == 1 and p.job_of(m).round == 1 else None),
            ServerSettings(round_timeout=0.3),
            r"client\(s\) 1 lost: .*did not answer within federation\.client_timeout",
        ),
    ],
    ids=["not-joined", "node-unavailable", "no-reply"],
)
def test_a_missing_or_lost_supernode_is_named_with_what_to_do(
    corpus_dir, tmp_path, monkeypatch, grid, settings, cause
):
    """Through the CLI (the federation replaced by the in-process grid): the stop says which clients,
    why (not joined / lost), what to do, and how to continue; never a ClientApp's error text."""
    import cotune.runtime.flower.deploy as deploy

    def fake_run_on_flower(runs, console, **kwargs):
        for run_dir, cfg in runs:
            run_server(cfg, run_dir, grid(), settings or ServerSettings.from_config(cfg), say=lambda s: None)
            check_outcome(run_dir)

    monkeypatch.setattr(deploy, "run_on_flower", fake_run_on_flower)
    cfg = _config_file(corpus_dir, tmp_path, federation={"clients": 2, "rounds": 2})
    out = tmp_path / "r"
    code, said = _cli_run(str(cfg), "--out", str(out), "--backend", "flower", "--superlink", "10.0.0.1:8000")
    assert code == 2 and "the run stopped" in said, said
    assert re.search(cause, said), said
    assert f"cotune run --resume {out} --backend flower" in said
