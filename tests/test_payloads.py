"""The port's typed payloads and their one wire codec: every field of a report or a client's description
arrives as it was sent, in process and on Flower alike, list-valued and nested metrics included (a
Flower MetricRecord holds numbers and flat lists only: they used to be dropped on the way)."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
pytest.importorskip("flwr")

from flwr.app import ConfigRecord, MetricRecord, RecordDict
from tests.conftest import tiny_tree
from tests.test_flower import InProcessGrid

from cotune.config import config_from_dict
from cotune.evaluation.lm import LMEval
from cotune.runtime.client import ClientWork
from cotune.runtime.flower import protocol as p
from cotune.runtime.flower.clients import FlowerClients, ServerSettings, decoded, report
from cotune.runtime.flower.node import Node, NodeSettings
from cotune.runtime.port import ClientInfo, EvalReport, PeerScores, Replies, TrainReport

# What a client may report beyond the typed fields: a list, a nested mapping, a string, extreme floats.
EXTRA = {
    "step_losses": [3.25, 3.0, 2.875, 1e-300, 1 / 3],
    "by_layer": {"q_proj": {"norm": 0.5, "ranks": [4, 4]}, "v_proj": {"norm": 0.1 + 0.2}},
    "note": "ok",
    "exact": 2.0**-1074,
}

PAYLOADS = [
    TrainReport(2.5, 2.25, 1e-3, 1234.5, 7, 0.125, EXTRA),
    TrainReport(2.5, float("inf"), 0.0, 0.0, 0, 0.0),
    EvalReport(LMEval(2.0, 7.38905609893065, 0.25, 96), LMEval(2.5, 12.182493960703473, 0.125, 32), EXTRA),
    EvalReport(LMEval(1.0, 2.718281828459045, 0.5, 8)),
    PeerScores((3.5, 1 / 7, float("inf"))),
    ClientInfo(
        3,
        "cpu",
        train_windows=16,
        val_windows=4,
        test_windows=0,
        label_names=("a", "b"),
        mixture=(0.25, 0.75),
    ),
    ClientInfo(1, "cuda:0", examples=90, own_data=True),
    p.Job("fedcollm", "model:\n  name: tiny\n", "ab12", 3, "k", {0: 2, 2: 1}, None, weights={0: 30, 2: 40}),
    p.Job("personalized", "", "", 1, peers=p.PeerArgs((0, 2, 3), 2), base=p.BaseRange(4, 2)),
    p.Job("personalized", "", "", 1, steps=5, predict=p.PredictArgs(2, 4, 8)),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda x: type(x).__name__)
def test_every_payload_round_trips_the_codec_exactly(payload):
    back = p.decode(p.encode(payload), type(payload))
    assert back == payload and type(back) is type(payload)
    assert all(type(a) is type(b) for a, b in zip(vars(back).values(), vars(payload).values(), strict=True))


def test_nan_survives_the_codec():
    back = p.decode(p.encode(TrainReport(float("nan"), float("nan"), 0.0, 0.0, 1, 0.0)), TrainReport)
    assert back.loss != back.loss and back.last_loss != back.last_loss


def test_the_codec_refuses_another_kind_or_a_mistyped_field():
    with pytest.raises(ValueError, match="expected a TrainReport"):
        p.decode(p.encode(PeerScores((1.0,))), TrainReport)
    bad = ConfigRecord({p.KIND: "ClientInfo", p.FIELDS: '{"partition": "2", "device": "cpu"}'})
    with pytest.raises(ValueError, match=r"ClientInfo\.partition: not int"):
        p.decode(bad, ClientInfo)
    missing = ConfigRecord({p.KIND: "EvalReport", p.FIELDS: '{"test": null}'})
    with pytest.raises(ValueError, match="EvalReport"):
        p.decode(missing, EvalReport)


def test_a_reply_that_does_not_decode_fails_its_client_not_the_run():
    """A node of another cotune version (the old MetricRecord reply) or a reply of the wrong kind is a failed
    client, named why; the others' answers stand."""
    good = RecordDict({p.REPORT: p.encode(PeerScores((1.0, 2.0)))})
    other = RecordDict({p.REPORT: p.encode(EvalReport(LMEval(1.0, 2.0, 0.5, 3)))})
    old = RecordDict({"cotune.metrics": MetricRecord({"ppl": [1.0, 2.0]})})
    got = decoded(Replies({0: good, 1: other, 2: old}, {3: "silent"}), lambda b: report(b, PeerScores))
    assert got.ok == {0: PeerScores((1.0, 2.0))}
    assert sorted(got.failed) == [1, 2, 3] and got.failed[3] == "silent"
    assert all(got.failed[i].startswith("unreadable reply") for i in (1, 2))


def test_list_valued_and_nested_metrics_arrive_on_flower(corpus_dir, tmp_path, monkeypatch):
    """Through the real ClientApp on the in-process grid: a train and an evaluate report with a list-valued
    and a nested metric reach the server's loop as the node made them (they were dropped before)."""
    cfg = config_from_dict(
        tiny_tree(
            corpus_dir, tmp_path, run={"threads": 1}, data={"test_fraction": 0.2}, federation={"clients": 2}
        )
    )
    made: dict[str, list] = {"train": [], "evaluate": []}
    train_report, evaluate = ClientWork.train_report, ClientWork.evaluate

    def reported(self, log, n):
        made["train"].append(replace(train_report(self, log, n), extra=EXTRA))
        return made["train"][-1]

    def evaluated(self):
        made["evaluate"].append(replace(evaluate(self), extra={**EXTRA, "client": [self.index]}))
        return made["evaluate"][-1]

    monkeypatch.setattr(ClientWork, "train_report", reported)
    monkeypatch.setattr(ClientWork, "evaluate", evaluated)
    node = Node("personalized", cfg, NodeSettings(0, 2))
    adapter = node.work.adapter()
    node.close()

    clients = FlowerClients(cfg, InProcessGrid(2), cfg.family, ServerSettings(), say=lambda s: None)
    described = clients.describe()
    assert described.ok[1].partition == 1 and described.ok[1].label_names and described.ok[1].val_windows
    trained = clients.train(1, {0: adapter, 1: adapter}, 2)
    evaluated_ = clients.evaluate(1, {0: adapter, 1: adapter})
    assert not trained.failed and not evaluated_.failed
    assert [trained.ok[i].report for i in (0, 1)] == made["train"]
    assert [evaluated_.ok[i] for i in (0, 1)] == made["evaluate"]
    assert trained.ok[1].report.extra["by_layer"]["q_proj"]["ranks"] == [4, 4]
    assert evaluated_.ok[1].extra["client"] == [1] and evaluated_.ok[1].test is not None
