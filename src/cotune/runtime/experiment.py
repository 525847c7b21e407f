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

from cotune.algorithms.fedcollm import PLANS
from cotune.config.loader import dump_config, load_config
from cotune.config.schema import ExperimentConfig
from cotune.data.task_data import build_task_data
from cotune.data.windows import build_federated_data
from cotune.models.compat import check_same_tokenizer
from cotune.models.loader import load_base_model, resolve_device, resolve_dtype
from cotune.models.lora import AdapterPool
from cotune.runtime.common import open_latest_checkpoint
from cotune.runtime.cotuning import LLM_ADAPTER, SERVER, CoTuningRuntime
from cotune.runtime.embedded import PersonalizedRuntime, ResumeError, client_name

log = logging.getLogger("cotune")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def baseline_names(cfg: ExperimentConfig) -> list[str]:
    """What `run.compare` adds: strategies (personalized) or algorithms (FedCoLLM family)."""
    main = cfg.algorithm if cfg.is_cotuning else cfg.strategy.name
    return [s for s in dict.fromkeys(cfg.run.compare) if s != main]


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


def run_experiment(
    cfg: ExperimentConfig, run_dir: Path | None = None, console: Console | None = None
) -> list[Path]:
    """Run the configured experiment, then each `run.compare` entry on identical data and init.

    Returns the run directories, the main run first.
    """
    console = console or Console(stderr=True)
    run_dir = run_dir or default_run_dir(cfg)
    dirs = comparison_dirs(run_dir, cfg)
    variants = [cfg] + [variant(cfg, s) for s in baseline_names(cfg)]
    created = [d for d in dirs if not d.exists()]
    for d, v in zip(dirs, variants, strict=True):
        init_run_dir(d, v)
    try:
        _run_variants(variants, dirs, console)
    except BaseException:
        discard_unstarted(created)
        raise
    return dirs


def discard_unstarted(dirs: list[Path]) -> None:
    """Remove run directories this call created that hold nothing but their config.yaml.

    A model, data or LoRA-target error found while loading then leaves no half-made run behind.
    """
    for d in dirs:
        if d.is_dir() and [p.name for p in d.iterdir()] == ["config.yaml"]:
            (d / "config.yaml").unlink()
            d.rmdir()


def _run_variants(variants: list[ExperimentConfig], dirs: list[Path], console: Console) -> None:
    cfg = variants[0]
    if cfg.is_cotuning:
        _run_cotuning(variants, dirs, console)
        return
    base, tokenizer, device = _load_model(cfg, console)
    data = _load_data(cfg, tokenizer, console)
    for d, v in zip(dirs, variants, strict=True):
        console.print(f"[bold]strategy {v.strategy.name}[/] -> {d}")
        seed_everything(v.run.seed)
        pool = AdapterPool(base, v.lora, [client_name(i) for i in range(v.federation.clients)])
        PersonalizedRuntime(v, pool, data, d, device, console).run()
        base = pool.unload()


def resume_experiment(run_dir: Path, console: Console | None = None) -> Path:
    console = console or Console(stderr=True)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ResumeError(f"{run_dir} is not a run directory (no config.yaml)")
    from cotune.runtime.flower import is_flower_run  # no flwr import: works without the flower extra

    if is_flower_run(run_dir):
        raise ResumeError(
            f"{run_dir} is a Flower run: it cannot be resumed (its clients' optimizer states lived on the "
            "SuperNodes); start a new run"
        )
    cfg = load_config(config_path)
    cfg.run.name = run_dir.name
    open_latest_checkpoint(run_dir, cfg)  # refuse another config's checkpoint before loading anything
    if cfg.is_cotuning:
        _run_cotuning([cfg], [run_dir], console, resume=True)
        return run_dir
    base, tokenizer, device = _load_model(cfg, console)
    data = _load_data(cfg, tokenizer, console)
    seed_everything(cfg.run.seed)
    pool = AdapterPool(base, cfg.lora, [client_name(i) for i in range(cfg.federation.clients)])
    PersonalizedRuntime(cfg, pool, data, run_dir, device, console).run(resume=True)
    return run_dir


def _needs_llm(cfg: ExperimentConfig) -> bool:
    return cfg.llm is not None and (PLANS[cfg.algorithm].uses_llm or cfg.algorithm == "zero_shot")


def _run_cotuning(
    variants: list[ExperimentConfig], dirs: list[Path], console: Console, resume: bool = False
) -> None:
    """FedCoLLM and its baselines: load the SLM (and the LLM once, if any variant needs it)."""
    cfg = variants[0]
    slm_base, tokenizer, device = _load_model(cfg, console)
    llm_base = None
    if any(_needs_llm(v) for v in variants):
        assert cfg.llm is not None
        llm_cfg = cfg.model_copy(update={"model": cfg.llm.model})
        llm_base, llm_tokenizer, _ = _load_model(llm_cfg, console)
        check_same_tokenizer(tokenizer, llm_tokenizer, (cfg.model.name, cfg.llm.model.name))
    assert cfg.task is not None
    with console.status("building the task splits"):
        task = build_task_data(cfg.task, cfg.federation.clients, tokenizer, cfg.run.seed)
    sizes = ", ".join(str(n) for n in task.client_sizes)
    console.print(f"  task: {len(task.public)} public, clients [{sizes}], {len(task.test)} test examples")
    eval_cache: dict = {}  # one base model per role and one test split: scores carry across variants
    for d, v in zip(dirs, variants, strict=True):
        console.print(f"[bold]algorithm {v.algorithm}[/] -> {d}")
        seed_everything(v.run.seed)
        names = [client_name(i) for i in range(v.federation.clients)] + [SERVER]
        slm = AdapterPool(slm_base, v.lora, names)
        llm = None
        if _needs_llm(v):
            assert v.llm is not None and llm_base is not None
            llm = AdapterPool(llm_base, v.llm.lora, [LLM_ADAPTER])
        CoTuningRuntime(v, slm, llm, task, tokenizer, d, device, console, eval_cache).run(resume=resume)
        slm_base = slm.unload()
        if llm is not None:
            llm_base = llm.unload()


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
