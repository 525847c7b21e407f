"""Third-party caches kept inside the run directory, so a run writes nothing outside the folder it names.

Left alone, the libraries cotune uses write under the home directory and `$TMPDIR`: matplotlib its
font list (`~/.cache/matplotlib`, `~/.config/matplotlib`), torch its compile cache directory
(`$TMPDIR/torchinductor_<user>`, created when torch._dynamo is imported), Triton its kernels
(`~/.triton`, on a GPU), MLflow an installation id (`~/.config/mlflow/telemetry.json`) for the usage
telemetry it would send. `confine_caches(run_dir)` points each at `run_dir/.cache/<library>` and turns
MLflow's telemetry off; a variable the user set before cotune started is left as they set it. It must
run before those libraries are imported (matplotlib reads its variable once, at import).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_DIR", "CACHE_VARIABLES", "confine_caches"]

CACHE_DIR = ".cache"  # inside the run directory
CACHE_VARIABLES = {  # environment variable -> folder under run_dir/.cache
    "MPLCONFIGDIR": "matplotlib",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "TRITON_CACHE_DIR": "triton",
}
OFF = {"MLFLOW_DISABLE_TELEMETRY": "true"}  # no usage reports to MLflow's servers, no id file under ~

_USER_SET = {name for name in [*CACHE_VARIABLES, *OFF] if name in os.environ}  # as cotune found them


def confine_caches(run_dir: Path) -> None:
    """Point the third-party caches at `run_dir/.cache` (this run's, also after an earlier run in this
    process) unless the user chose a place for them."""
    root = Path(run_dir).resolve() / CACHE_DIR
    for name, folder in CACHE_VARIABLES.items():
        if name not in _USER_SET:  # each library creates its folder when it first writes there
            os.environ[name] = str(root / folder)
    for name, value in OFF.items():
        if name not in _USER_SET:
            os.environ[name] = value
