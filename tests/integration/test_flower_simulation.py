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

from cotune.config import load_config
from cotune.reporting.metrics import load_run
from cotune.runtime.checkpoint import latest_checkpoint
from cotune.runtime.experiment import run_experiment

# one xdist worker: never two Ray clusters at once on this machine
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]


def adapters(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    path = latest_checkpoint(run_dir)[1]
    return {d.name: load_file(str(d / "adapter_model.safetensors")) for d in sorted(path.glob("client-*"))}


@pytest.fixture(scope="module")
def simulated(corpus_dir, tmp_path_factory) -> tuple[Path, Path, str]:
    """ONE `cotune run --backend flower-simulation` (4 virtual nodes on Ray actors, 2 rounds of validation
    trust), output piped: both tests below read it, so the Ray cluster starts once.
    Returns (config file, run dir, what the terminal got)."""
    import subprocess
    import sys

    import yaml

    tmp = tmp_path_factory.mktemp("simulation")
    tree = tiny_tree(corpus_dir, tmp, strategy={"name": "validation"}, run={"threads": 1})
    cfg_path = tmp / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    out = tmp / "sim"
    cmd = [sys.executable, "-m", "cotune.cli.main", "run", str(cfg_path), "--out", str(out)]
    t0 = time.perf_counter()
    done = subprocess.run(
        [*cmd, "--backend", "flower-simulation", "--client-cpus", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-3000:]
    print(f"\nsimulation: {time.perf_counter() - t0:.0f}s for 2 rounds, 4 virtual nodes")
    return cfg_path, out, said


def test_two_actors_give_the_embedded_adapters(simulated, tmp_path):
    cfg_path, sim, _ = simulated
    cfg = load_config(str(cfg_path), [])
    assert cfg.strategy.name == "validation" and cfg.federation.rounds == 2
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    ours, theirs = adapters(embedded), adapters(sim)
    assert ours.keys() == theirs.keys() and len(ours) == cfg.federation.clients
    assert all(torch.equal(ours[c][k], theirs[c][k]) for c in ours for k in ours[c])
    assert load_run(sim).ended and (sim / "flower" / "node-state").is_dir()


def test_the_terminal_gets_cotunes_lines_not_flowers_warnings_or_colour_codes(simulated):
    """`cotune run --backend flower-simulation`, output piped: no deprecation notices, no warnings of
    Flower or Ray, no ANSI escape codes; they are kept in RUN_DIR/flower/simulation.log."""
    _, out, said = simulated
    assert "round 2/2" in said  # cotune's own progress is there
    for noise in ("DeprecationWarning", "FutureWarning", "DEPRECATED FEATURE", "\x1b[", "flwr: "):
        assert noise not in said, (noise, said[-3000:])
    assert "DEPRECATED FEATURE" in (out / "flower" / "simulation.log").read_text()
