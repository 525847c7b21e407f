"""What every runtime shares: run bookkeeping, config fingerprints, resume of metrics."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from safetensors.torch import load_file

from cotune.config.loader import dump_config
from cotune.config.schema import ExperimentConfig
from cotune.reporting.metrics import read_metrics
from cotune.runtime.checkpoint import latest_checkpoint, load_state


class ResumeError(RuntimeError):
    """A run directory that cannot be resumed with this config."""


def config_fingerprint(cfg: ExperimentConfig) -> str:
    """What must match for a checkpoint to be resumed (everything but the run's bookkeeping)."""
    text = dump_config(cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": None})}))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def client_name(index: int) -> str:
    return f"client-{index:02d}"


def open_latest_checkpoint(run_dir: Path, cfg: ExperimentConfig) -> tuple[int, Path, dict[str, Any]]:
    """The last completed round's checkpoint and its state, refused if another config wrote it."""
    found = latest_checkpoint(run_dir)
    if found is None:
        raise ResumeError(f"{run_dir} has no completed checkpoint to resume from")
    r, path = found
    state = load_state(path / "state.pt")
    if state["fingerprint"] != config_fingerprint(cfg):
        raise ResumeError(f"the checkpoint in {path} was written by a different config; cannot resume")
    return r, path, state


def load_adapter(directory: Path) -> dict[str, torch.Tensor]:
    """An adapter saved in PEFT format by `AdapterPool.save`."""
    return load_file(str(directory / "adapter_model.safetensors"))


def truncate_metrics(path: Path, last_round: int) -> None:
    """Drop the records of rounds after `last_round` (the round in progress when a run stopped)."""
    kept = [m for m in read_metrics(path) if m.get("type") == "run" or m.get("round", 0) <= last_round]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(m, separators=(",", ":")) + "\n" for m in kept))
    tmp.replace(path)


class RoundRuntime(Protocol):
    """What `start_or_resume` needs of a runtime (both families have it)."""

    cfg: ExperimentConfig
    run_dir: Path
    console: Console

    def log(self, record: dict) -> None: ...
    def evaluate(self, r: int) -> Any: ...
    def checkpoint(self, r: int) -> None: ...
    def restore(self) -> int: ...


def start_or_resume(rt: RoundRuntime, resume: bool, strategy: str, clients: int) -> int:
    """The first round to run: after the last checkpoint when resuming, else 1 once round 0 is scored.

    A fresh run logs its start, evaluates the untrained models (round 0, the zero-shot reference)
    and checkpoints them, so even a run killed in round 1 resumes without re-scoring them.
    """
    if resume:
        last = rt.restore()
        rt.console.print(f"[bold]resuming[/] {rt.run_dir} after round {last}")
        return last + 1
    rt.log(
        {
            "type": "run",
            "event": "start",
            "algorithm": rt.cfg.algorithm,
            "strategy": strategy,
            "clients": clients,
            "time": time.time(),
        }
    )
    rt.evaluate(0)
    rt.checkpoint(0)
    return 1
