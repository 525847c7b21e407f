"""From a validated config to finished run directories: model, data, runtime, report.

This is the one place that wires the layers together; the CLI and the tests call it.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from cotune.config.loader import dump_config, load_config
from cotune.config.schema import ExperimentConfig
from cotune.data.windows import build_federated_data
from cotune.models.loader import load_base_model, resolve_device, resolve_dtype
from cotune.models.lora import AdapterPool
from cotune.runtime.embedded import PersonalizedRuntime, ResumeError, client_name

log = logging.getLogger("cotune")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def baseline_strategies(cfg: ExperimentConfig) -> list[str]:
    return [s for s in dict.fromkeys(cfg.run.compare) if s != cfg.strategy.name]


def comparison_dirs(run_dir: Path, cfg: ExperimentConfig) -> list[Path]:
    """The main run directory, then one sibling `<run_dir>.<strategy>` per `run.compare` strategy."""
    return [run_dir] + [run_dir.with_name(f"{run_dir.name}.{s}") for s in baseline_strategies(cfg)]


def default_run_dir(cfg: ExperimentConfig) -> Path:
    """runs/<name>, or runs/<name>-2, -3... so a rerun never overwrites an earlier run."""
    base = cfg.run.out_dir / (cfg.run.name or "run")
    candidate, n = base, 1
    while any(d.exists() for d in comparison_dirs(candidate, cfg)):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def init_run_dir(run_dir: Path, cfg: ExperimentConfig) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"run directory {run_dir} is not empty; use --resume {run_dir} or another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))


def strategy_variant(cfg: ExperimentConfig, strategy: str) -> ExperimentConfig:
    return cfg.model_copy(
        update={
            "strategy": cfg.strategy.model_copy(update={"name": strategy}),
            "run": cfg.run.model_copy(update={"compare": []}),
        },
        deep=True,
    )


def run_experiment(
    cfg: ExperimentConfig, run_dir: Path | None = None, console: Console | None = None
) -> list[Path]:
    """Run the configured strategy, then each `run.compare` strategy on identical data and init.

    Returns the run directories, the main run first.
    """
    console = console or Console(stderr=True)
    run_dir = run_dir or default_run_dir(cfg)
    dirs = comparison_dirs(run_dir, cfg)
    variants = [cfg] + [strategy_variant(cfg, s) for s in baseline_strategies(cfg)]
    for d, v in zip(dirs, variants, strict=True):
        init_run_dir(d, v)

    base, tokenizer, device = _load_model(cfg, console)
    data = _load_data(cfg, tokenizer, console)
    for d, v in zip(dirs, variants, strict=True):
        console.print(f"[bold]strategy {v.strategy.name}[/] -> {d}")
        seed_everything(v.run.seed)
        pool = AdapterPool(base, v.lora, [client_name(i) for i in range(v.federation.clients)])
        PersonalizedRuntime(v, pool, data, d, device, console).run()
        base = pool.unload()
    return dirs


def resume_experiment(run_dir: Path, console: Console | None = None) -> Path:
    console = console or Console(stderr=True)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ResumeError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(config_path)
    cfg.run.name = run_dir.name
    base, tokenizer, device = _load_model(cfg, console)
    data = _load_data(cfg, tokenizer, console)
    seed_everything(cfg.run.seed)
    pool = AdapterPool(base, cfg.lora, [client_name(i) for i in range(cfg.federation.clients)])
    PersonalizedRuntime(cfg, pool, data, run_dir, device, console).run(resume=True)
    return run_dir


def _load_model(cfg: ExperimentConfig, console: Console):
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    with console.status(f"loading model {cfg.model.name} on {device} ({dtype})"):
        base, tokenizer = load_base_model(cfg.model, device, dtype)
    n_params = sum(p.numel() for p in base.parameters())
    console.print(f"model {cfg.model.name}: {n_params / 1e6:.1f}M parameters on {device} ({dtype})")
    return base, tokenizer, device


def _load_data(cfg: ExperimentConfig, tokenizer, console: Console):
    with console.status("building client datasets"):
        data = build_federated_data(cfg.data, cfg.federation.clients, tokenizer, cfg.run.seed)
    for i, c in enumerate(data.clients):
        labels = ", ".join(f"{k}:{v}" for k, v in sorted(c.label_counts.items()))
        console.print(f"  client {i}: {len(c.train)} train / {len(c.val)} val windows  ({labels})")
    console.print(f"  public reference set: {len(data.public)} windows of {cfg.data.seq_len} tokens")
    return data
