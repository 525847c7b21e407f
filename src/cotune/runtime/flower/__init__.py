"""cotune on Flower: the same algorithms across machines, with a SuperLink and one SuperNode per data owner.

The ServerApp (`server_app:app`) and ClientApp (`client_app:app`) use Flower's Message API; the
algorithm code (trust, aggregation, training step, evaluation) is the one the embedded runtime uses.
See docs/flower.md for the deployment and `python -m cotune.runtime.flower --help` for the entry point.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

# No traffic to flower.ai from any process that imports this package (telemetry and the CLI update
# check are on by default in flwr); set before flwr is imported by the submodules.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if TYPE_CHECKING:
    from rich.console import Console

    from cotune.config.schema import ExperimentConfig

__all__ = ["FLOWER_ENV", "FLOWER_STATE_FILE", "FlowerRunError", "is_flower_run", "run_flower"]

# The environment every Flower process of a cotune deployment runs with (see deploy.py and the script).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# What a Flower checkpoint holds besides the adapters (not the embedded state.pt: no optimizer states).
FLOWER_STATE_FILE = "flower_state.pt"


class FlowerRunError(RuntimeError):
    """The Flower run did not complete: the server stopped (too few clients) or failed."""


def is_flower_run(run_dir: Path) -> bool:
    """A run directory written by the Flower backend (its optimizer states lived on the SuperNodes)."""
    from cotune.runtime.checkpoint import list_checkpoints

    return any((path / FLOWER_STATE_FILE).exists() for _, path in list_checkpoints(run_dir))


def run_flower(
    cfg: ExperimentConfig, run_dir: Path | None = None, console: Console | None = None, **kwargs: Any
) -> list[Path]:
    """`cotune run --backend flower`: see deploy.run_flower. Importable without the flower extra."""
    if importlib.util.find_spec("flwr") is None:
        raise FlowerRunError("the Flower backend needs flwr: pip install -e '.[flower]' (or make setup)")
    from cotune.runtime.flower.deploy import run_flower as run

    return run(cfg, run_dir, console, **kwargs)
