"""The orchestrator: from a validated config to finished run directories, on either transport.

It names and creates the run directories (the main run and one sibling per `run.compare` entry),
builds the in-process clients and the round loop of the config's family, or hands the variants to
the Flower deployment; the CLI and the tests call it. Nothing below it imports it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from cotune.algorithms.fedcollm import plan_of
from cotune.config.loader import load_config
from cotune.config.schema import ExperimentConfig
from cotune.data.windows import FederatedData
from cotune.runtime.fedcollm import FedCoLLMLoop
from cotune.runtime.flower import require_flwr
from cotune.runtime.inprocess import InProcessClients
from cotune.runtime.personalized import PersonalizedLoop
from cotune.runtime.rundir import (
    ResumeError,
    RunFiles,
    baseline_names,
    comparison_dirs,
    default_run_dir,
    init_run_dir,
    is_flower_run,
    variant,
)
from cotune.runtime.setup import (
    adapter_pool,
    fedcollm_pools,
    fedcollm_server,
    fedcollm_works,
    load_fedcollm_models,
    load_model,
    load_task,
    load_windows,
    needs_llm,
    personalized_works,
)

log = logging.getLogger("cotune")


def run_experiment(
    cfg: ExperimentConfig,
    run_dir: Path | None = None,
    console: Console | None = None,
    backend: str = "embedded",
    **flower: Any,
) -> list[Path]:
    """Run the configured experiment, then each `run.compare` entry on identical data and init.

    `backend="flower"` runs the variants that have a client step on a Flower federation (`flower`:
    the options of `cotune.runtime.flower.deploy.run_on_flower`) and the others in this process.
    Returns the run directories, the main run first.
    """
    console = console or Console(stderr=True)
    run_dir = run_dir or default_run_dir(cfg)
    if backend == "flower":
        require_flwr()  # before anything is created
        from cotune.runtime.flower.deploy import check_flower_config, run_on_flower

        check_flower_config(cfg)
        run_dir = run_dir.resolve()  # the ServerApp may run elsewhere
    dirs = comparison_dirs(run_dir, cfg)
    variants = [cfg] + [variant(cfg, s) for s in baseline_names(cfg)]
    created = [d for d in dirs if not d.exists()]
    for d, v in zip(dirs, variants, strict=True):
        init_run_dir(d, v)
    try:
        if backend == "flower":
            federated = [(d, v) for d, v in zip(dirs, variants, strict=True) if has_client_step(v)]
            local = [(d, v) for d, v in zip(dirs, variants, strict=True) if not has_client_step(v)]
            for d, v in local:
                console.print(f"[bold]algorithm {v.algorithm}[/] has no client step: embedded runtime -> {d}")
            run_embedded([v for _, v in local], [d for d, _ in local], console)
            run_on_flower(federated, console, **flower)
        else:
            run_embedded(variants, dirs, console)
    except BaseException:
        discard_unstarted(created)
        raise
    return dirs


def has_client_step(cfg: ExperimentConfig) -> bool:
    """Whether the variant has a client step (what runs on SuperNodes); centralized and zero_shot do not."""
    return not cfg.is_cotuning or plan_of(cfg.algorithm).local_training


def discard_unstarted(dirs: list[Path]) -> None:
    """Remove run directories this call created that hold nothing but their config.yaml.

    A model, data or LoRA-target error found while loading then leaves no half-made run behind.
    """
    for d in dirs:
        if d.is_dir() and [p.name for p in d.iterdir()] == ["config.yaml"]:
            (d / "config.yaml").unlink()
            d.rmdir()


def run_embedded(
    variants: list[ExperimentConfig], dirs: list[Path], console: Console, resume: bool = False
) -> None:
    """The variants in this process, on one loaded base model (or pair) and one data split."""
    if not variants:
        return
    if variants[0].is_cotuning:
        run_fedcollm_family(variants, dirs, console, resume)
    else:
        run_personalized(variants, dirs, console, resume)


def run_personalized(
    variants: list[ExperimentConfig], dirs: list[Path], console: Console, resume: bool = False
) -> None:
    cfg = variants[0]
    base, tokenizer, device = load_model(cfg, console=console)
    data = load_windows(cfg, tokenizer, console)
    for d, v in zip(dirs, variants, strict=True):
        console.print(f"[bold]strategy {v.strategy.name}[/] -> {d}")
        base = run_personalized_variant(v, d, base, data, device, console, resume)


def run_personalized_variant(
    cfg: ExperimentConfig,
    run_dir: Path,
    base: torch.nn.Module,
    data: FederatedData,
    device: torch.device,
    console: Console,
    resume: bool = False,
) -> torch.nn.Module:
    """One personalized run on a loaded base model and data split; gives the untouched base back."""
    pool = adapter_pool(cfg, base)
    slot = pool.names[0]
    clients = InProcessClients(cfg, personalized_works(cfg, pool, data, device))
    loop = PersonalizedLoop(
        cfg, clients, pool.state(slot), lambda s, p: pool.save(slot, p, s), RunFiles(run_dir, cfg), console
    )
    try:
        loop.run(resume)
    finally:
        base = pool.unload()
    return base


def run_fedcollm_family(
    variants: list[ExperimentConfig], dirs: list[Path], console: Console, resume: bool = False
) -> None:
    """FedCoLLM and its baselines: load the SLM (and the LLM once, if any variant needs it)."""
    cfg = variants[0]
    slm_base, llm_base, tokenizer, device = load_fedcollm_models(
        cfg, console, any(needs_llm(v) for v in variants)
    )
    task = load_task(cfg, tokenizer, console)
    eval_cache: dict = {}  # one base model per role and one test split: scores carry across variants
    for d, v in zip(dirs, variants, strict=True):
        console.print(f"[bold]algorithm {v.algorithm}[/] -> {d}")
        slm, llm = fedcollm_pools(v, slm_base, llm_base)
        clients = InProcessClients(v, fedcollm_works(v, slm, task, device, len(tokenizer)))
        server = fedcollm_server(v, slm, llm, task, tokenizer, device)
        FedCoLLMLoop(v, clients, server, task, RunFiles(d, v), console, eval_cache).run(resume)
        slm_base = slm.unload()
        if llm is not None:
            llm_base = llm.unload()


def resume_experiment(run_dir: Path, console: Console | None = None, **flower: Any) -> Path:
    """Continue a run after its last complete checkpoint, on the backend it ran on.

    A Flower run resumes on Flower (`flower`: the options of `run_on_flower`; by default a local
    federation): its SuperNodes reload their trainer states from their own state-dir.
    """
    console = console or Console(stderr=True)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ResumeError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(config_path)
    cfg.run.name = run_dir.name
    RunFiles(run_dir, cfg).open_latest()  # refuse another config's checkpoint before loading anything
    if is_flower_run(run_dir):
        require_flwr()
        from cotune.runtime.flower.deploy import run_on_flower

        run_on_flower([(run_dir.resolve(), cfg)], console, resume=True, **flower)
    elif any(v is not None for k, v in flower.items() if k != "connect_timeout"):
        raise ResumeError(f"{run_dir} ran in one process (embedded): resume it without Flower options")
    else:
        run_embedded([cfg], [run_dir], console, resume=True)
    return run_dir
