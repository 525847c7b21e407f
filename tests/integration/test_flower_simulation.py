"""Flower's simulation engine as a backend: virtual SuperNodes on Ray actors, the same ServerApp loop
and ClientApp, the embedded adapters bit for bit."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
pytest.importorskip("ray")

from tests.conftest import tiny_tree

from cotune.config import config_from_dict
from cotune.reporting.metrics import load_run
from cotune.runtime.checkpoint import latest_checkpoint
from cotune.runtime.experiment import run_experiment

pytestmark = pytest.mark.slow


def adapters(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    path = latest_checkpoint(run_dir)[1]
    return {d.name: load_file(str(d / "adapter_model.safetensors")) for d in sorted(path.glob("client-*"))}


def test_two_actors_give_the_embedded_adapters(corpus_dir, tmp_path):
    tree = tiny_tree(corpus_dir, tmp_path, strategy={"name": "validation"}, run={"threads": 1})
    cfg = config_from_dict(tree)
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    t0 = time.perf_counter()
    (sim,) = run_experiment(cfg, tmp_path / "sim", backend="flower-simulation", client_cpus=1.0)
    print(
        f"\nsimulation: {time.perf_counter() - t0:.0f}s for {cfg.federation.rounds} rounds, 4 virtual nodes"
    )
    ours, theirs = adapters(embedded), adapters(sim)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[c][k], theirs[c][k]) for c in ours for k in ours[c])
    assert load_run(sim).ended and (sim / "flower" / "node-state").is_dir()
