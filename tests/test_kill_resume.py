"""SIGKILL a real `cotune run` at several moments; `--resume` ends with the uninterrupted run's adapters."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tests.conftest import tiny_tree

from cotune.config import config_from_dict
from cotune.reporting.metrics import read_metrics
from cotune.runtime.checkpoint import latest_checkpoint
from cotune.runtime.experiment import run_experiment

CLI = [sys.executable, "-m", "cotune.cli.main"]


def _adapters(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    _, path = latest_checkpoint(run_dir)
    return {p.name: load_file(str(p / "adapter_model.safetensors")) for p in sorted(path.glob("client-*"))}


def _sections() -> dict:
    return {
        "federation": {"rounds": 6, "local_steps": 4, "warmup_steps": 4},
        "strategy": {"name": "validation"},
        "lora": {"dropout": 0.1},  # dropout draws from the RNG: resume must restore it
    }


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [*CLI, "run", *args], stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the kill point")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("kill point not reached in time")
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # the line being written when killed
            out.append(json.loads(line))
    return out


def _has(run_dir: Path, **match) -> bool:
    return any(all(r.get(k) == v for k, v in match.items()) for r in _records(run_dir))


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_resumable_run(corpus_dir, tmp_path):
    tree = tiny_tree(corpus_dir, tmp_path, **_sections())
    (full,) = run_experiment(config_from_dict({**tree, "run": {**tree["run"], "name": "full"}}))

    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    run_dir = tmp_path / "killed"
    log = tmp_path / "cli.log"
    checkpoints = run_dir / "checkpoints"

    # 1. while the first round's checkpoint is being written, or just after (as close as polling gets)
    proc = _start([str(cfg_path), "--out", str(run_dir)], log)
    _kill_when(
        proc, lambda: any(checkpoints.glob(".tmp-round-0001-*")) or (checkpoints / "round-0001").is_dir()
    )
    assert latest_checkpoint(run_dir)[0] in (0, 1)
    # 2. mid-round: some clients of round 3 have trained, its checkpoint is not written
    proc = _start(["--resume", str(run_dir)], log)
    _kill_when(proc, lambda: _has(run_dir, type="train", round=3, client=1))
    assert latest_checkpoint(run_dir)[0] == 2

    proc = _start(["--resume", str(run_dir)], log)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]

    a, b = _adapters(full), _adapters(run_dir)
    assert latest_checkpoint(run_dir)[0] == 6 and a.keys() == b.keys()
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    evals = [[m for m in read_metrics(d / "metrics.jsonl") if m["type"] == "eval"] for d in (full, run_dir)]
    assert evals[0] == evals[1]
    assert not list(checkpoints.glob(".tmp-*"))
