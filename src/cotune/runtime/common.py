"""What every runtime shares: run bookkeeping, config fingerprints, resume of metrics."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cotune.config.loader import dump_config
from cotune.config.schema import ExperimentConfig
from cotune.reporting.metrics import read_metrics


class ResumeError(RuntimeError):
    """A run directory that cannot be resumed with this config."""


def config_fingerprint(cfg: ExperimentConfig) -> str:
    """What must match for a checkpoint to be resumed (everything but the run's bookkeeping)."""
    text = dump_config(cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": None})}))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def client_name(index: int) -> str:
    return f"client-{index:02d}"


def truncate_metrics(path: Path, last_round: int) -> None:
    """Drop the records of rounds after `last_round` (the round in progress when a run stopped)."""
    kept = [m for m in read_metrics(path) if m.get("type") == "run" or m.get("round", 0) <= last_round]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(m, separators=(",", ":")) + "\n" for m in kept))
    tmp.replace(path)
