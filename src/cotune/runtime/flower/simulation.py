"""Flower's simulation engine as a backend (`cotune run CONFIG --backend flower-simulation`).

The same ServerApp round loop and the same ClientApp as a deployment, with virtual SuperNodes
(`partition-id` 0..N-1) served by a pool of Ray actors: `client_cpus` / `client_gpus` are each
actor's resources, so the pool has (CPUs / client_cpus) actors here, one per GPU with
`client_gpus: 1`, and spans a Ray cluster when one is running. The ServerApp runs in this process
(a thread of Flower's simulation runtime). Each node keeps its trainer state on disk as on a real
SuperNode (`node_state.py`), under `RUN_DIR/flower/node-state`, so any actor can serve any node and
a run resumes like a deployment one. Needs the `simulation` extra (`pip install -e '.[simulation]'`:
flwr[simulation], i.e. Ray).

Flower's and Ray's chatter (deprecation notices, INFO lines in colour, the actors' output) goes to
`RUN_DIR/flower/simulation.log`, not the terminal; `cotune --verbose` shows it there too (without
colour codes when the output is not a terminal).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from cotune.config.schema import ExperimentConfig
from cotune.layout import FLOWER_DIR, NODE_STATE_DIR, SIMULATION_LOG
from cotune.runtime.flower import FlowerRunError
from cotune.runtime.flower.node_state import STATE_ENV
from cotune.runtime.flower.outcome import check_outcome


def require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise FlowerRunError(
            "--backend flower-simulation needs Flower's simulation engine (Ray): "
            "pip install -e '.[simulation]'"
        ) from None


def run_on_simulation(
    runs: Sequence[tuple[Path, ExperimentConfig]],
    console: Console,
    *,
    client_cpus: float = 1.0,
    client_gpus: float = 0.0,
    resume: bool = False,
) -> None:
    """Run each (run directory, config) on Flower's simulation engine; raise if one did not complete."""
    require_ray()
    from cotune.runtime.flower.server_app import check_resumable, prepare_run_dir

    console.print(
        f"Flower's simulation engine: {client_cpus:g} CPU / {client_gpus:g} GPU per actor", highlight=False
    )
    resources: dict[str, Any] = {"num_cpus": client_cpus, "num_gpus": client_gpus}
    backend = {"client_resources": resources}
    for run_dir, cfg in runs:
        if resume:
            check_resumable(run_dir, cfg)
        else:
            prepare_run_dir(run_dir, cfg)
        # The actors inherit this process's environment: the virtual nodes keep their state where a
        # local deployment's SuperNodes do (RUN_DIR/flower/node-state), so either can resume the run.
        before = os.environ.get(STATE_ENV)
        os.environ[STATE_ENV] = str(run_dir / FLOWER_DIR / NODE_STATE_DIR)
        try:
            simulate(cfg, run_dir, backend, console, resume)
        finally:
            if before is None:
                os.environ.pop(STATE_ENV, None)
            else:
                os.environ[STATE_ENV] = before
        check_outcome(run_dir)


def simulate(
    cfg: ExperimentConfig, run_dir: Path, backend: dict[str, Any], console: Console, resume: bool
) -> None:
    """One run: the ServerApp loop in a thread of this process, the ClientApp on the actors."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from cotune.runtime.flower.client_app import app as client_app
    from cotune.runtime.flower.clients import ServerSettings
    from cotune.runtime.flower.server_app import run_server

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: object, cfg: ExperimentConfig = cfg, run_dir: Path = run_dir) -> None:
        run_server(cfg, run_dir, grid, ServerSettings.from_config(cfg), say=console.print, resume=resume)

    console.print(f"[bold]{cfg.algorithm}[/]: {cfg.federation.clients} virtual SuperNodes -> {run_dir}")
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)  # `cotune --verbose`
    log_path = run_dir / FLOWER_DIR / SIMULATION_LOG
    console.print(f"Flower's and Ray's messages: {log_path}", highlight=False)
    # The actors' output reaches this terminal only under --verbose (Ray keeps it in its session logs).
    backend = {**backend, "init_args": {"logging_level": "ERROR", "log_to_driver": verbose}}
    with quiet_flower(log_path, verbose):
        run_simulation(server, client_app, num_supernodes=cfg.federation.clients, backend_config=backend)


@contextlib.contextmanager
def quiet_flower(log_path: Path, verbose: bool) -> Iterator[None]:
    """Flower's log and Python warnings into `log_path` for the duration; on the terminal only when
    `verbose`, and without colour codes unless stderr is a terminal."""
    from flwr.common.logger import FLOWER_LOGGER, console_handler, update_console_handler

    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    propagate = FLOWER_LOGGER.propagate
    FLOWER_LOGGER.addHandler(handler)
    FLOWER_LOGGER.propagate = False  # the root logger's handler (cli: basicConfig) would repeat every line
    if verbose:
        update_console_handler(colored=sys.stderr.isatty())
    else:
        FLOWER_LOGGER.removeHandler(console_handler)

    def to_log(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: object = None,
        line: str | None = None,
    ) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        record = logging.LogRecord("py.warnings", logging.WARNING, filename, lineno, text, None, None)
        handler.emit(record)
        if verbose:
            print(text, file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = to_log
            yield
    finally:
        FLOWER_LOGGER.removeHandler(handler)
        handler.close()
        FLOWER_LOGGER.propagate = propagate
        if console_handler not in FLOWER_LOGGER.handlers:
            FLOWER_LOGGER.addHandler(console_handler)
