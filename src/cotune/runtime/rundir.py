"""The run directory: its layout, config fingerprint, metrics log and checkpoints, and resume.

Below the round loops and the orchestrator: both loops checkpoint through `RunFiles`, and the
orchestrator names and creates directories with the helpers here.

    <run_dir>/config.yaml         the resolved config
    <run_dir>/metrics.jsonl       one JSON record per line (cotune.reporting.metrics reads it)
    <run_dir>/checkpoints/round-NNNN/
        <adapter>/adapter_model.safetensors + adapter_config.json   (PEFT format)
        state.pt                  round, fingerprint, RNG, the trainer states, the backend
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from cotune.config.loader import dump_config
from cotune.config.schema import ExperimentConfig
from cotune.records import Record, RunEvent
from cotune.reporting.metrics import append_metrics, read_metrics
from cotune.runtime.checkpoint import latest_checkpoint, load_state, restore_rng, rng_state, save_state
from cotune.runtime.checkpoint import write_checkpoint as write_round
from cotune.state import AdapterState

STATE_FILE = "state.pt"


class ResumeError(RuntimeError):
    """A run directory that cannot be resumed with this config."""


def client_name(index: int) -> str:
    return f"client-{index:02d}"


def config_fingerprint(cfg: ExperimentConfig) -> str:
    """What must match for a checkpoint to be resumed (everything but the run's bookkeeping)."""
    text = dump_config(cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": None})}))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- naming and creating run directories (the orchestrator's) -------------------------------------------
def main_name(cfg: ExperimentConfig) -> str:
    """What a run is called in its family: the strategy (personalized) or the algorithm (FedCoLLM)."""
    return cfg.algorithm if cfg.is_cotuning else cfg.strategy.name


def baseline_names(cfg: ExperimentConfig) -> list[str]:
    """What `run.compare` adds: strategies (personalized) or algorithms (FedCoLLM family)."""
    return [s for s in dict.fromkeys(cfg.run.compare) if s != main_name(cfg)]


def comparison_dirs(run_dir: Path, cfg: ExperimentConfig) -> list[Path]:
    """The main run directory, then one sibling `<run_dir>.<name>` per `run.compare` entry."""
    return [run_dir] + [run_dir.with_name(f"{run_dir.name}.{s}") for s in baseline_names(cfg)]


def default_run_dir(cfg: ExperimentConfig) -> Path:
    """runs/<name> (runs/<name>.<algorithm> for the FedCoLLM family); -2, -3... if taken."""
    name = cfg.run.name or "run"
    suffix = f".{cfg.algorithm}" if cfg.is_cotuning else ""
    candidate, n = cfg.run.out_dir / f"{name}{suffix}", 1
    while any(d.exists() for d in comparison_dirs(candidate, cfg)):
        n += 1
        candidate = cfg.run.out_dir / f"{name}-{n}{suffix}"
    return candidate


def init_run_dir(run_dir: Path, cfg: ExperimentConfig) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"run directory {run_dir} is not empty; use --resume {run_dir} or another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))


def variant(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    """The same experiment with another strategy (personalized) or algorithm (FedCoLLM family)."""
    update: dict = {"run": cfg.run.model_copy(update={"compare": []})}
    if cfg.is_cotuning:
        update["algorithm"] = name
    else:
        update["strategy"] = cfg.strategy.model_copy(update={"name": name})
    return cfg.model_copy(update=update, deep=True)


def is_flower_run(run_dir: Path) -> bool:
    """A run directory written by the Flower backend (its clients' trainer states lived on the nodes)."""
    found = latest_checkpoint(run_dir)
    return found is not None and load_state(found[1] / STATE_FILE).get("backend") == "flower"


# ---- what a running loop writes -------------------------------------------------------------------------
class RunFiles:
    """A round loop's view of its run directory: append metrics, write and open checkpoints."""

    def __init__(self, run_dir: Path, cfg: ExperimentConfig, backend: str = "embedded") -> None:
        self.run_dir, self.cfg, self.backend = Path(run_dir), cfg, backend
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.fingerprint = config_fingerprint(cfg)

    def log(self, record: Record) -> None:
        append_metrics(self.metrics_path, record.line())

    def checkpoint(
        self,
        round_: int,
        adapters: Mapping[str, Callable[[Path], None]],
        state: Mapping[str, Any],
    ) -> None:
        """Round `round_`'s checkpoint, atomically: each `adapters[name](dir)` writes one adapter."""

        def contents(tmp: Path) -> None:
            for name, write in adapters.items():
                write(tmp / name)
            full = {
                "round": round_,
                "fingerprint": self.fingerprint,
                "backend": self.backend,
                "rng": rng_state(),
                **state,
            }
            save_state(tmp / STATE_FILE, full)

        write_round(self.run_dir, round_, contents)

    def open_latest(self) -> tuple[int, Path, dict[str, Any]]:
        """The last completed round's checkpoint and its state, refused if another config wrote it."""
        found = latest_checkpoint(self.run_dir)
        if found is None:
            raise ResumeError(f"{self.run_dir} has no completed checkpoint to resume from")
        r, path = found
        state = load_state(path / STATE_FILE)
        if state["fingerprint"] != self.fingerprint:
            raise ResumeError(f"the checkpoint in {path} was written by a different config; cannot resume")
        return r, path, state

    def resume(self) -> tuple[int, Path, dict[str, Any]]:
        """Open the latest checkpoint, restore the RNG, drop the metrics of the unfinished round."""
        r, path, state = self.open_latest()
        restore_rng(state["rng"])
        self.truncate_metrics(r)
        self.log(RunEvent(event="resume", after_round=r))
        print(f"resuming {self.run_dir} after round {r}", file=sys.stderr, flush=True)
        return r, path, state

    def truncate_metrics(self, last_round: int) -> None:
        """Drop the records of rounds after `last_round` (the round in progress when a run stopped)."""
        path = self.metrics_path
        kept = [m for m in read_metrics(path) if m.get("type") == "run" or m.get("round", 0) <= last_round]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(m, separators=(",", ":")) + "\n" for m in kept))
        tmp.replace(path)


def load_adapter(directory: Path) -> AdapterState:
    """An adapter saved in PEFT format."""
    return load_file(str(directory / "adapter_model.safetensors"))


def first_round(
    files: RunFiles, resume: bool, restore: Callable[[], int], round_zero: Callable[[], None]
) -> int:
    """The first round a loop runs: the one after the restored checkpoint, or 1 after a fresh start
    (the start record, then `round_zero`: round 0's evaluation and checkpoint)."""
    if resume:
        return restore() + 1
    cfg = files.cfg
    files.log(
        RunEvent(
            event="start",
            algorithm=cfg.algorithm,
            strategy=main_name(cfg),
            clients=cfg.federation.clients,
            backend=files.backend,
        )
    )
    round_zero()
    return 1
