"""cotune on Flower: the same algorithms across machines, with a SuperLink and one SuperNode per data owner.

The ServerApp (`server_app:app`) and ClientApp (`client_app:app`) use Flower's Message API; the
algorithm code (trust, aggregation, training step, evaluation) is the one the embedded runtime uses.
See docs/flower.md for the deployment; `cotune run CONFIG --backend flower` is the entry point.
"""

from __future__ import annotations

import importlib.util
import os

from cotune.errors import OrdinaryError
from cotune.process import prepare_process

# No traffic to flower.ai from any process that imports this package (telemetry and the CLI update
# check are on by default in flwr); set before flwr is imported by the submodules.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
prepare_process()  # also in the ServerApp and ClientApp processes Flower starts, which never run the CLI

__all__ = ["FLOWER_ENV", "FlowerRunError", "require_flwr"]

# The environment every Flower process of a cotune deployment runs with (see deploy.py and the script).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class FlowerRunError(RuntimeError, OrdinaryError):
    """The Flower run did not complete: the server stopped (too few clients) or failed."""


def require_flwr() -> None:
    """The Flower backend needs the flower extra; say how to get it before anything starts."""
    if importlib.util.find_spec("flwr") is None:
        raise FlowerRunError("the Flower backend needs flwr: pip install -e '.[flower]' (or make setup)")
