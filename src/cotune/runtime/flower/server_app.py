"""The cotune ServerApp: reads the experiment from the run config and drives the round loop.

Run config keys (`[tool.flwr.app.config]`, overridable with `flwr run ... --run-config`):

- ``config``: path of the experiment YAML, as the ServerApp process sees it (relative to where the
  SuperLink was started), or ``config-yaml``: the YAML text itself (what `run_flower` sends, so the
  config travels with the run to a remote SuperLink);
- ``overrides``: space-separated dotted overrides, as on the `cotune run` command line;
- ``run-dir``: where the run directory is written (default: ``run.out_dir/<name>`` as `cotune run`);
- ``min-clients`` and ``round-timeout`` (seconds): when > 0, they replace ``federation.min_clients`` and
  ``federation.client_timeout`` of the config (0: the config's, whose defaults are all clients and 600 s);
  ``connect-timeout``: seconds to wait for the SuperNodes at the start. See ServerSettings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cotune.config.loader import apply_overrides, config_from_dict, dump_config, load_config
from cotune.config.schema import ExperimentConfig
from cotune.runtime.experiment import default_run_dir
from cotune.runtime.flower.deploy import OUTCOME_MARK, run_outcome, with_run_settings
from cotune.runtime.flower.server import ServerSettings, server_for

app = ServerApp()


def experiment_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    overrides = str(run_config.get("overrides", "") or "").split()
    text = str(run_config.get("config-yaml", "") or "")
    if text:
        return config_from_dict(apply_overrides(yaml.safe_load(text) or {}, overrides), "(config-yaml)")
    path = str(run_config.get("config", "") or "")
    if not path:
        raise ValueError("the run config needs 'config' (a YAML path) or 'config-yaml' (the YAML text)")
    return load_config(path, overrides)


def prepare_run_dir(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Create the run directory, or accept one prepared for this config (config.yaml, nothing run yet)."""
    config_file = run_dir / "config.yaml"
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists():
        raise FileExistsError(f"run directory {run_dir} already holds a run; choose another run-dir")
    if config_file.exists() and config_file.read_text() != dump_config(cfg):
        raise FileExistsError(f"{config_file} was written for another config; choose another run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file.write_text(dump_config(cfg))


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = with_run_settings(experiment_config(context.run_config), context.run_config)
    given = str(context.run_config.get("run-dir", "") or "")
    run_dir = Path(given) if given else default_run_dir(cfg)
    prepare_run_dir(run_dir, cfg)
    what = cfg.algorithm if cfg.is_cotuning else f"{cfg.algorithm}/{cfg.strategy.name}"
    print(f"cotune {what} on Flower -> {run_dir.resolve()}", flush=True)
    try:
        settings = ServerSettings.from_config(cfg, context.run_config)
        server_for(cfg, run_dir, grid, settings).run()
    finally:
        outcome = run_outcome(run_dir)
        print(OUTCOME_MARK + json.dumps({**outcome, "run_dir": str(run_dir)}), flush=True)
