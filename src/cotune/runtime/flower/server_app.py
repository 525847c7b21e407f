"""The cotune ServerApp: reads the experiment from the run config and runs its family's round loop,
with the SuperNodes as its clients (`FlowerClients`).

Run config keys (`[tool.flwr.app.config]`, overridable with `flwr run ... --run-config`):

- ``config``: path of the experiment YAML, as the ServerApp process sees it (relative to where the
  SuperLink was started), or ``config-yaml``: the YAML text itself (what `cotune run --backend flower`
  sends, so the config travels with the run to a remote SuperLink);
- ``overrides``: space-separated dotted overrides, as on the `cotune run` command line;
- ``run-dir``: where the run directory is written (default: ``run.out_dir/<name>`` as `cotune run`);
- ``min-clients`` and ``round-timeout`` (seconds): when > 0, they replace ``federation.min_clients`` and
  ``federation.client_timeout`` of the config (0: the config's, whose defaults are all clients and 600 s);
  ``connect-timeout``: seconds to wait for the SuperNodes at the start;
- ``resume``: continue ``run-dir`` after its last complete checkpoint (what `cotune run --resume`
  sends for a Flower run); the SuperNodes reload their trainer states from their ``state-dir``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from cotune.config.loader import apply_overrides, config_from_dict, dump_config, load_config, parse_yaml
from cotune.config.schema import ExperimentConfig
from cotune.layout import CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE
from cotune.records import RunEvent
from cotune.runtime.checkpoint import latest_checkpoint
from cotune.runtime.compose import fedcollm_loop, has_client_step, personalized_loop
from cotune.runtime.fedcollm import FedCoLLMLoop
from cotune.runtime.flower.app import with_run_settings
from cotune.runtime.flower.clients import FlowerClients, ServerSettings
from cotune.runtime.flower.deploy import check_flower_config
from cotune.runtime.flower.outcome import OUTCOME_MARK, run_outcome
from cotune.runtime.lock import run_lock
from cotune.runtime.personalized import PersonalizedLoop
from cotune.runtime.quorum import TooFewClients
from cotune.runtime.rundir import CLIENTS_ON_FLOWER, ResumeError, RunFiles, default_run_dir, is_flower_run
from cotune.runtime.setup import (
    adapter_pool,
    fedcollm_pools,
    load_fedcollm_models,
    load_model,
    load_task,
    needs_llm,
)

app = ServerApp()


def experiment_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    overrides = str(run_config.get("overrides", "") or "").split()
    text = str(run_config.get("config-yaml", "") or "")
    if text:
        tree = parse_yaml(text, "(config-yaml)") or {}  # duplicate keys refused, aliases bounded
        return config_from_dict(apply_overrides(tree, overrides), "(config-yaml)")
    path = str(run_config.get("config", "") or "")
    if not path:
        raise ValueError("the run config needs 'config' (a YAML path) or 'config-yaml' (the YAML text)")
    return load_config(path, overrides)


def prepare_run_dir(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Create the run directory, or accept one prepared for this config (config.yaml, nothing run yet)."""
    config_file = run_dir / CONFIG_FILE
    if (run_dir / METRICS_FILE).exists() or (run_dir / CHECKPOINTS_DIR).exists():
        raise FileExistsError(f"run directory {run_dir} already holds a run; choose another run-dir")
    if config_file.exists() and config_file.read_text() != dump_config(cfg):
        raise FileExistsError(f"{config_file} was written for another config; choose another run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file.write_text(dump_config(cfg))


def check_resumable(run_dir: Path, cfg: ExperimentConfig) -> None:
    """A Flower run directory of this very config, with a checkpoint to continue from."""
    RunFiles(run_dir, cfg, backend=CLIENTS_ON_FLOWER).open_latest()
    if not is_flower_run(run_dir):
        raise ResumeError(f"{run_dir} was not run on Flower: resume it with `cotune run --resume` alone")


def server_loop(
    cfg: ExperimentConfig, run_dir: Path, clients: FlowerClients, console: Console
) -> PersonalizedLoop | FedCoLLMLoop:
    """The family's round loop (`runtime/compose.py`, as in process) with the SuperNodes as its clients."""
    files = RunFiles(run_dir, cfg, backend=CLIENTS_ON_FLOWER)
    if cfg.is_cotuning:  # the LLM and its LoRA only ever exist here, in the ServerApp
        slm_base, llm_base, tokenizer, device, bridge = load_fedcollm_models(cfg, console, needs_llm(cfg))
        task = load_task(cfg, tokenizer, console, bridge, owners=False)  # owners' files stay on their nodes
        pools = fedcollm_pools(cfg, slm_base, llm_base)
        return fedcollm_loop(cfg, files, pools, task, tokenizer, device, clients, console, bridge=bridge)
    # personalized: the server only needs the initial adapter every client starts from (on its CPU)
    base, _, _ = load_model(cfg, console=console, device=torch.device("cpu"))
    return personalized_loop(cfg, files, adapter_pool(cfg, base, [0]), clients, console)


def run_server(
    cfg: ExperimentConfig,
    run_dir: Path,
    grid: Grid,
    settings: ServerSettings | None = None,
    say: Callable[[str], None] | None = None,
    resume: bool = False,
) -> str:
    """Run the rounds (or, `resume`, those after the last checkpoint); "completed" or "stopped" (too
    few clients left), as metrics.jsonl says; a failure is logged and raised."""
    check_flower_config(cfg)
    if not has_client_step(cfg):
        raise ValueError(
            f"algorithm {cfg.algorithm!r} has no client step, so nothing runs on the SuperNodes: run it "
            "with the embedded runtime (`cotune run CONFIG`; `cotune run --backend flower` does so for it)"
        )
    say = say or (lambda text: print(text, flush=True))
    with run_lock(run_dir):  # refused, before anything is written, when another process holds it
        return run_rounds(cfg, run_dir, FlowerClients(cfg, grid, cfg.family, settings, say), say, resume)


def run_rounds(
    cfg: ExperimentConfig, run_dir: Path, clients: FlowerClients, say: Callable[[str], None], resume: bool
) -> str:
    files = RunFiles(run_dir, cfg, backend=CLIENTS_ON_FLOWER)
    try:
        server_loop(cfg, run_dir, clients, Console(stderr=True)).run(resume)
    except TooFewClients as stop:
        last = latest_checkpoint(run_dir)
        files.log(RunEvent(event="stopped", reason=str(stop), last_checkpoint=last[0] if last else None))
        say(f"STOPPED {stop}; last complete checkpoint: {f'round {last[0]}' if last else 'none written'}")
        return "stopped"
    except Exception as exc:
        files.log(RunEvent(event="failed", error=f"{type(exc).__name__}: {exc}"))
        say(f"FAILED {type(exc).__name__}: {exc}")
        raise
    return "completed"


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = with_run_settings(experiment_config(context.run_config), context.run_config)
    given = str(context.run_config.get("run-dir", "") or "")
    run_dir = Path(given) if given else default_run_dir(cfg)
    resume = bool(context.run_config.get("resume", False))
    if resume:
        check_resumable(run_dir, cfg)
    else:
        prepare_run_dir(run_dir, cfg)
    what = cfg.algorithm if cfg.is_cotuning else f"{cfg.algorithm}/{cfg.strategy.name}"
    print(f"cotune {what} on Flower -> {run_dir.resolve()}", flush=True)
    try:
        run_server(cfg, run_dir, grid, ServerSettings.from_config(cfg, context.run_config), resume=resume)
    finally:
        outcome = run_outcome(run_dir)
        print(OUTCOME_MARK + json.dumps({**outcome, "run_dir": str(run_dir)}), flush=True)
