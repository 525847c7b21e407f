"""Experiment trackers (`run.loggers`): every record of metrics.jsonl mirrored to TensorBoard, MLflow or W&B.

A record becomes scalars tagged `<kind>[/<model|split|phase>]/<field>[/<client>]` at step = its round
(`train/loss/client-02`, `eval/test/ppl/client-00`, `round/mean_val_ppl`, `mc/slm/acc`,
`privacy/epsilon`), and a trust matrix also becomes a grey-scale heatmap image (`trust/matrix`). All
of them are offline by default, under the run directory: TensorBoard event files in `tensorboard/`, an
MLflow file store in `mlruns/` (unless MLFLOW_TRACKING_URI names another), W&B in offline mode in
`wandb/` (unless WANDB_MODE says otherwise). TensorBoard and MLflow are the `trackers` extra (`make
setup` installs it), W&B is `pip install wandb`; a missing one is refused before any work starts.
MLflow's usage telemetry is turned off (MLFLOW_DISABLE_TELEMETRY) unless the user set it. Only
numbers leave the run: metric values, and the resolved config as MLflow parameters / W&B config.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cotune.config.names import TrackerName
from cotune.errors import OrdinaryError
from cotune.layout import MLFLOW_DIR, TENSORBOARD_DIR
from cotune.records import Record

QUALIFIERS = ("model", "split", "phase", "event")  # fields that say which series a record belongs to
IDENTIFIERS = ("type", "round", "step", "client", "time", "n", "example", *QUALIFIERS)


class TrackerError(ValueError, OrdinaryError):
    """A configured tracker cannot be used (its package is missing)."""


def installed(name: str) -> bool:
    """Whether a tracker's package is importable (each tracker's package has the tracker's name)."""
    return importlib.util.find_spec(name) is not None


def check_trackers(names: Sequence[str]) -> None:
    """Refuse, before any work, trackers whose package is not installed."""
    missing = [n for n in names if not installed(n)]
    if missing:
        which = "it" if len(missing) == 1 else "them"
        raise TrackerError(
            f"run.loggers {missing}: not installed; install them (tensorboard, mlflow: the trackers extra, "
            f"which make setup installs, or pip install -e '.[trackers]' in the cotune checkout; wandb: "
            f"pip install wandb) or remove {which}"
        )


def scalars(record: Record) -> list[tuple[str, float]]:
    """The record's numeric fields as (tag, value)."""
    data = record.model_dump()
    kind = str(data["type"])
    qualifiers = [str(data[q]) for q in QUALIFIERS if data.get(q) is not None]
    client = data.get("client")
    out = []
    for field, value in data.items():
        if field in IDENTIFIERS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        tag = "/".join([kind, *qualifiers, field])
        out.append((f"{tag}/client-{client:02d}" if client is not None else tag, float(value)))
    return out


def heatmap(matrix: Sequence[Sequence[float]], cell: int = 16) -> np.ndarray:
    """A trust matrix as an (H, W, 3) uint8 image: rows receivers, columns senders, white = weight 1."""
    m = np.clip(np.asarray(matrix, dtype=np.float64), 0.0, 1.0)
    pixels = np.kron(m, np.ones((cell, cell)))
    grey = (255 * pixels).round().astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


class Tracker(Protocol):
    def scalar(self, tag: str, value: float, step: int) -> None: ...
    def image(self, tag: str, image: np.ndarray, step: int) -> None: ...
    def close(self) -> None: ...


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), flush_secs=10)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports, no id file under ~
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a file store in the run directory: offline, and what mlflow-skinny can write
            uri = (run_dir / MLFLOW_DIR).resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps it, in maintenance
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("cotune")
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment("cotune")
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
        for key, value in flat(config).items():
            self.client.log_param(self.run_id, key, str(value)[:500])

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.client.log_metric(self.run_id, tag, value, step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, image, key=tag, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE", "offline")
        self.run = wandb.init(dir=str(run_dir), name=run_dir.name, config=config, mode=mode)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value, "round": step})

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image), "round": step})

    def close(self) -> None:
        self.run.finish()


OPENERS: dict[TrackerName, Callable[[Path, dict[str, Any]], Tracker]] = {
    "tensorboard": TensorBoard,
    "mlflow": MLflow,
    "wandb": WandB,
}


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}."))
        else:
            out[name] = value
    return out


class Trackers:
    """The run's trackers, opened on the first record and closed by the run's end record."""

    def __init__(self, names: Sequence[TrackerName], run_dir: Path, config: dict[str, Any]) -> None:
        check_trackers(names)  # also where a ServerApp runs: refused before its first round
        self.names, self.run_dir, self.config = list(names), run_dir, config
        self.open: list[Tracker] | None = None

    def log(self, record: Record) -> None:
        if not self.names:
            return
        if self.open is None:
            self.open = [OPENERS[name](self.run_dir, self.config) for name in self.names]
        step = int(getattr(record, "round", None) or 0)
        values = scalars(record)
        matrix = getattr(record, "matrix", None)
        for tracker in self.open:
            for tag, value in values:
                tracker.scalar(tag, value, step)
            if matrix is not None:
                tracker.image(f"{record.type}/matrix", heatmap(matrix), step)
        if getattr(record, "type", "") == "run" and getattr(record, "event", "") == "end":
            self.close()

    def close(self) -> None:
        for tracker in self.open or []:
            tracker.close()
        self.open = None
