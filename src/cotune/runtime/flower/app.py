"""The Flower App and one run on a SuperLink: what `flwr run` ships and how it is called.

- `write_app_dir` writes the Flower App (a pyproject.toml naming the installed cotune ServerApp and
  ClientApp): the FAB that `flwr run` ships carries no code, every machine runs its installed cotune.
- `submit` starts one run on a SuperLink through the Control API (`flwr run ... --stream`), with a
  private FLWR_HOME so the user's own Flower configuration is never read or written; `Progress` copies
  its lines to the terminal.
- `with_run_settings`: the run config's settings (`APP_CONFIG`) applied to the experiment config.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import tomli_w
from rich.console import Console

from cotune.config.schema import ExperimentConfig
from cotune.runtime.flower import FLOWER_ENV
from cotune.runtime.flower.outcome import OUTCOME_MARK

SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
CONNECTION = "cotune"  # the SuperLink connection name in the private FLWR_HOME
APP_NAME = "cotune-flower"

# The [tool.flwr.app] of the Flower App; pyproject.toml carries the same tables (tests check they agree).
APP_COMPONENTS = {
    "serverapp": "cotune.runtime.flower.server_app:app",
    "clientapp": "cotune.runtime.flower.client_app:app",
}
APP_CONFIG: dict[str, str | int | float | bool] = {
    "config": "",
    "config-yaml": "",
    "overrides": "",
    "run-dir": "",
    "min-clients": 0,  # 0: federation.min_clients (default all)
    "round-timeout": 0.0,  # 0: federation.client_timeout (default 600 s)
    "connect-timeout": 120.0,
    "resume": False,  # continue run-dir after its last checkpoint (`cotune run --resume`)
}


def with_run_settings(cfg: ExperimentConfig, run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The config with the run config's min-clients / round-timeout (when > 0) as federation settings."""
    update: dict[str, Any] = {}
    if int(run_config.get("min-clients", 0) or 0) > 0:
        update["min_clients"] = int(run_config["min-clients"])
    if float(run_config.get("round-timeout", 0) or 0) > 0:
        update["client_timeout"] = float(run_config["round-timeout"])
    if not update:
        return cfg
    fed = cfg.federation.model_copy(update=update)
    return cfg.model_copy(update={"federation": type(cfg.federation).model_validate(fed.model_dump())})


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process: no telemetry, offline, this venv's commands first."""
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    # flower-superlink / -supernode start flower-superexec, flwr-serverapp and flwr-clientapp by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # A SuperNode's SuperExec looks for a message to start a ClientApp for once a second by default;
    # the look is a local call, so every 0.2 s costs nothing and answers sooner.
    env.setdefault(SUPEREXEC_POLL_ENV, "0.2")
    return env


def write_app_dir(path: Path) -> Path:
    """A Flower App directory for `flwr run PATH <connection>`: the installed cotune's apps."""
    path.mkdir(parents=True, exist_ok=True)
    tree = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": APP_NAME,
            "version": "0.1.0",
            "description": "cotune on Flower: the ServerApp and ClientApp of the installed cotune package",
            "license": {"text": "Apache-2.0"},
            # Installed on every machine beforehand; Flower must not install anything (no network).
            "dependencies": ["flwr>=1.41,<1.42"],
        },
        "tool": {
            "flwr": {"app": {"publisher": "cotune", "components": APP_COMPONENTS, "config": APP_CONFIG}}
        },
    }
    (path / "pyproject.toml").write_text(tomli_w.dumps(tree))
    return path


def write_connection(
    flwr_home: Path, address: str, *, insecure: bool = True, root_certificates: Path | None = None
) -> None:
    """The private Flower configuration ($FLWR_HOME/config.toml) with one SuperLink connection."""
    conn: dict[str, Any] = {"address": address}
    if root_certificates is not None:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    else:
        conn["insecure"] = insecure
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}})
    )


def submit(
    app_dir: Path,
    flwr_home: Path,
    run_config: Mapping[str, str | int | float],
    log_path: Path,
    timeout: float | None = None,
    echo: IO[str] | Progress | None = None,
) -> int:
    """`flwr run APP cotune --run-config FILE --stream`: start the run and follow its log until it ends."""
    overrides = log_path.with_suffix(".run-config.toml")
    overrides.write_text(tomli_w.dumps(dict(run_config)))
    cmd = ["flwr", "run", str(app_dir), CONNECTION, "--run-config", str(overrides), "--stream"]
    with log_path.open("a") as log:
        proc = subprocess.Popen(
            cmd, env=flower_env(flwr_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

        def copy() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if echo is not None:
                    echo.write(line)

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"flwr run did not finish within {timeout:g}s (log: {log_path})") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(5)
        return code


ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


class Progress:
    """Where `submit` copies the `flwr run --stream` lines, so the terminal follows the run as it goes
    (the ServerApp's rounds, clients and evaluation lines): to `console`'s file, without colour codes
    unless that is a terminal, without the outcome marker (read from the log afterwards)."""

    def __init__(self, console: Console) -> None:
        self.file, self.keep_colour = console.file, console.is_terminal

    def write(self, line: str) -> None:
        if OUTCOME_MARK in line or not line.strip():
            return
        self.file.write(line if self.keep_colour else ANSI_ESCAPE.sub("", line))
        self.file.flush()
