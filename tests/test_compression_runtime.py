"""Compressed exchanges in a run (federation.compress): off is today's run, bit for bit; with a codec the
comm records count the encoded bytes, both transports give the same adapters, and a client's
error-feedback residual survives a resume."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_tree
from tests.test_cotuning import task_file, tree  # noqa: F401  (task_file is a fixture)

from cotune.algorithms.compression import Compression, state_size
from cotune.config import config_from_dict
from cotune.reporting.metrics import read_metrics
from cotune.reporting.report import write_report
from cotune.runtime.checkpoint import latest_checkpoint
from cotune.runtime.experiment import resume_experiment, run_experiment

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def adapters(run_dir: Path, pattern: str = "client-*") -> dict[str, dict[str, torch.Tensor]]:
    found = latest_checkpoint(run_dir)
    assert found is not None
    dirs = [d for d in sorted(found[1].glob(pattern)) if d.is_dir()]
    return {d.name: load_file(str(d / "adapter_model.safetensors")) for d in dirs}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[c][k], b[c][k]) for c in a for k in a[c])


def comm(run_dir: Path) -> list[dict]:
    keys = ("round", "client", "bytes_up", "bytes_down")
    return [{k: m[k] for k in keys} for m in read_metrics(run_dir / "metrics.jsonl") if m["type"] == "comm"]


def personalized(corpus_dir: Path, tmp_path: Path, name: str, **federation):
    fed = {"rounds": 2, "local_steps": 2, "warmup_steps": 2, **federation}
    return config_from_dict(tiny_tree(corpus_dir, tmp_path, run={"name": name, "threads": 1}, federation=fed))


def test_compress_none_is_todays_run_bit_for_bit(corpus_dir, tmp_path):
    """An explicit `compress: none` changes no adapter and no byte count."""
    (plain,) = run_experiment(personalized(corpus_dir, tmp_path, "plain"))
    (explicit,) = run_experiment(personalized(corpus_dir, tmp_path, "none", compress="none"))
    assert same(adapters(plain), adapters(explicit))
    assert comm(plain) == comm(explicit)


def test_comm_records_count_the_encoded_bytes(corpus_dir, tmp_path):
    """fedavg sends each client its adapter twice a round (to train, to evaluate) and takes its update
    once: int8 with 64-weight blocks down, top-10% int8 up, each exactly as the codec sends it."""
    (plain,) = run_experiment(personalized(corpus_dir, tmp_path, "plain"))
    spec = Compression(codec="int8", block=64, topk=0.1)
    (packed,) = run_experiment(
        personalized(corpus_dir, tmp_path, "int8", compress={"codec": "int8", "topk": 0.1})
    )
    adapter = adapters(packed)["client-00"]
    whole, update = state_size(adapter, spec), state_size(adapter, spec, sparsify=True)
    raw = sum(t.numel() * 4 for t in adapter.values())
    rows = comm(packed)
    assert rows and all(r["bytes_down"] == 2 * whole and r["bytes_up"] == update for r in rows)
    assert all(r["bytes_up"] == raw for r in comm(plain))
    assert update < raw / 6  # (tiny tensors of 64 weights: a scale and int32 positions weigh much)
    assert not same(adapters(plain), adapters(packed))  # lossy indeed


@pytest.mark.slow
def test_the_residual_is_client_state_a_resumed_run_continues_it(corpus_dir, tmp_path):
    """Top-k with error feedback: a run resumed from round 1 ends with the uninterrupted run's adapters,
    because each client's residual is checkpointed with its optimizer (without it round 2's updates
    would differ)."""
    fed = {"rounds": 3, "compress": {"codec": "int8", "topk": 0.05}}
    (full,) = run_experiment(personalized(corpus_dir, tmp_path, "full", **fed))
    (part,) = run_experiment(personalized(corpus_dir, tmp_path, "part", **fed))
    for r in (2, 3):
        shutil.rmtree(part / "checkpoints" / f"round-{r:04d}")
    resume_experiment(part)
    assert same(adapters(full), adapters(part))


# ---- both transports --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy",
    [
        "fedavg",
        "validation",
        pytest.param("flora", marks=pytest.mark.slow),
        pytest.param("fedex_lora", marks=pytest.mark.slow),
    ],
)
def test_int8_on_flower_gives_the_embedded_adapters(corpus_dir, tmp_path, strategy):
    pytest.importorskip("flwr")
    from tests.test_flower import InProcessGrid, _run_flower_in_process

    cfg = config_from_dict(
        tiny_tree(
            corpus_dir,
            tmp_path,
            run={"threads": 1},
            strategy={"name": strategy},
            federation={"compress": {"codec": "int8", "topk": 0.2}},
        )
    )
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    sent: list[int] = []
    grid = InProcessGrid(cfg.federation.clients, watch_downlink(sent))
    assert _run_flower_in_process(cfg, tmp_path / "flower", grid) == "completed"
    assert same(adapters(embedded), adapters(tmp_path / "flower"))
    rows = comm(embedded)
    assert rows == comm(tmp_path / "flower")
    # what travels is encoded, of exactly the bytes the comm records count: each update a node sends
    # back, and every adapter the server sends (their shapes beside them are framing)
    assert uploaded_bytes(grid) == [r["bytes_up"] for r in rows]
    if strategy not in ("flora", "fedex_lora"):  # their merged history travels as float32 (cotune.base)
        assert sum(sent) == sum(r["bytes_down"] for r in rows)


def watch_downlink(sent: list[int]):
    """A fate that answers normally and adds each message's adapter payload bytes to `sent`."""
    from cotune.runtime.flower import protocol as p

    def fate(i: int, msg) -> None:
        if p.JOB in msg.content and p.job_of(msg).round == 0:  # round 0's evaluation: no comm records
            return
        for name, record in msg.content.array_records.items():
            if name == p.ADAPTER or name.startswith(p.PEER_PREFIX):
                tensors = p.record_to_tensors(record)
                assert any(k.endswith("::shape") for k in tensors)  # encoded, not float32
                sent.append(sum(t.numel() * t.element_size() for k, t in tensors.items() if "::part" in k))

    return fate


def uploaded_bytes(grid) -> list[int]:
    """The payload bytes of every train reply's update, in order; a reply with an adapter fails."""
    from cotune.runtime.flower import protocol as p

    out = []
    for reply in grid.replies:
        records = reply.content.array_records
        assert p.ADAPTER not in records
        if p.UPDATE in records:
            out.append(
                sum(t.numel() * t.element_size() for t in p.record_to_tensors(records[p.UPDATE]).values())
            )
    return out


@pytest.mark.parametrize("codec", ["int8", "nf4"])
def test_fedcollm_fedavg_compressed_on_flower_gives_the_embedded_adapters(task_file, tmp_path, codec):  # noqa: F811
    pytest.importorskip("flwr")
    from tests.test_flower import InProcessGrid, _run_flower_in_process

    fed = {"compress": {"codec": codec, "block": 32, "topk": 0.25}}
    cfg = config_from_dict(tree(task_file, tmp_path, "fedavg", run={"threads": 1}, federation=fed))
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    sent: list[int] = []
    grid = InProcessGrid(cfg.federation.clients, watch_downlink(sent))
    assert _run_flower_in_process(cfg, tmp_path / "flower", grid) == "completed"
    ours, theirs = adapters(embedded, "*"), adapters(tmp_path / "flower", "*")
    assert "server" in ours and same(ours, theirs)
    rows = comm(embedded)
    assert rows == comm(tmp_path / "flower")
    assert uploaded_bytes(grid) == [r["bytes_up"] for r in rows]
    assert sum(sent) == sum(r["bytes_down"] for r in rows)
    spec = Compression(codec=codec, block=32, topk=0.25)
    theta = ours["server"]
    assert all(r["bytes_down"] == state_size(theta, spec) for r in rows)
    assert all(r["bytes_up"] == state_size(theta, spec, sparsify=True) for r in rows)


def test_clients_trained_together_encode_their_updates_as_alone(corpus_dir, tmp_path):
    """federation.parallel_clients: each client of a shared step still encodes its own update."""
    fed = {"compress": {"codec": "nf4", "block": 16, "topk": 0.3}}
    (alone,) = run_experiment(personalized(corpus_dir, tmp_path, "alone", **fed))
    (together,) = run_experiment(personalized(corpus_dir, tmp_path, "together", parallel_clients=2, **fed))
    plain = personalized(corpus_dir, tmp_path, "plain", parallel_clients=2)
    (uncompressed,) = run_experiment(plain)
    assert comm(alone) == comm(together)
    a, b = adapters(alone), adapters(together)
    assert (
        max(float((a[c][k] - b[c][k]).abs().max()) for c in a for k in a[c]) < 1e-5
    )  # shared steps' rounding
    assert not same(adapters(uncompressed), b)


def test_the_report_names_each_compressed_runs_encoding(corpus_dir, tmp_path):
    fed = {"compress": {"codec": "int8", "topk": 0.1}}
    (run,) = run_experiment(personalized(corpus_dir, tmp_path, "int8", **fed))
    text = write_report([run]).read_text()
    assert "Compressed exchanges (federation.compress; bytes as encoded)" in text
    assert "int8, 64-weight blocks, the top 10% of each update with error feedback" in text
    (plain,) = run_experiment(personalized(corpus_dir, tmp_path, "plain"))
    assert "Compressed exchanges" not in write_report([plain]).read_text()


@pytest.mark.slow
def test_a_compressed_flower_run_resumes_with_each_nodes_residual(corpus_dir, tmp_path):
    """On Flower the residual lives on each node's disk with its optimizer state: a ServerApp that died in
    round 3 resumes (fresh node contexts) and ends with the uninterrupted embedded run's adapters."""
    pytest.importorskip("flwr")
    from tests.test_flower import (
        InProcessGrid,
        ServerKilled,
        _killed_in_round,
        _resume_in_process,
        _run_flower_in_process,
    )

    cfg = config_from_dict(
        tiny_tree(
            corpus_dir,
            tmp_path,
            run={"threads": 1},
            federation={"rounds": 3, "compress": {"codec": "int8", "topk": 0.05}},
        )
    )
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    run_dir = tmp_path / "flower"
    with pytest.raises(ServerKilled):  # in round 3, after some nodes trained it
        _run_flower_in_process(cfg, run_dir, InProcessGrid(4, _killed_in_round(3)))
    assert _resume_in_process(cfg, run_dir, InProcessGrid(4, run_id=8)) == "completed"
    assert same(adapters(embedded), adapters(run_dir))
