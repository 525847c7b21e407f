"""The orchestrator: from a validated config to finished run directories, on either transport.

It names and creates the run directories (the main run and one sibling per `run.compare` entry),
builds the in-process clients and the round loop of the config's family, or hands the variants to
the Flower deployment; the CLI and the tests call it. Nothing below it imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from cotune.algorithms.fedcollm import plan_of
from cotune.caches import confine_caches
from cotune.config.loader import dump_config
from cotune.config.schema import ExperimentConfig
from cotune.data.preflight import check_data
from cotune.data.windows import FederatedData
from cotune.records import RunEvent, parse_record
from cotune.reporting.metrics import METRICS_FILE, read_metrics
from cotune.reporting.trackers import check_trackers
from cotune.runtime.fedcollm import FedCoLLMLoop
from cotune.runtime.flower import require_flwr
from cotune.runtime.inprocess import InProcessClients
from cotune.runtime.lock import LOCK_FILE, run_lock
from cotune.runtime.personalized import PersonalizedLoop
from cotune.runtime.rundir import (
    ResumeError,
    RunFiles,
    baseline_names,
    comparison_dirs,
    default_run_dir,
    init_run_dir,
    is_flower_run,
    newest_intact,
    record_runtime_settings,
    resume_config,
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
    confine_caches(run_dir)  # before matplotlib, MLflow or a torch compile cache is first used
    check_trackers(cfg.run.loggers)  # before anything is created
    if cfg.privacy.no_guarantee:
        console.print(f"warning: {cfg.privacy.no_guarantee}", highlight=False, markup=False)
    if flower.get("superlink") is None:  # a remote federation's data lies on its SuperNodes
        check_data(cfg)  # every data problem at once, before any model loads
    if backend in FLOWER_BACKENDS:
        require_flwr()  # before anything is created
        from cotune.runtime.flower.deploy import check_flower_config

        check_flower_config(cfg)
        run_dir = run_dir.resolve()  # the ServerApp may run elsewhere
    dirs = comparison_dirs(run_dir, cfg)
    pairs = list(zip(dirs, [cfg] + [variant(cfg, s) for s in baseline_names(cfg)], strict=True))
    on_flower = backend in FLOWER_BACKENDS
    federated = [(d, v) for d, v in pairs if on_flower and has_client_step(v)]
    local = [(d, v) for d, v in pairs if (d, v) not in federated]
    created = [d for d in dirs if not d.exists()]
    try:
        with ExitStack() as held:  # this process writes the local runs (a ServerApp holds its own)
            for d, _ in local:
                held.enter_context(run_lock(d))
            for d, v in pairs:
                init_run_dir(d, v)
            for d, v in local if on_flower else []:
                console.print(f"[bold]algorithm {v.algorithm}[/] has no client step: embedded runtime -> {d}")
            run_embedded([v for _, v in local], [d for d, _ in local], console)
        if federated:
            run_federated(backend, federated, console, **flower)
    except BaseException:
        discard_unstarted(created)
        raise
    return dirs


FLOWER_BACKENDS = ("flower", "flower-simulation")


def run_federated(
    backend: str, runs: list[tuple[Path, ExperimentConfig]], console: Console, **options: Any
) -> None:
    """The runs with a client step on Flower: a deployment (real or local SuperNodes) or Flower's
    simulation engine (virtual SuperNodes on Ray actors); `options` are that backend's."""
    if backend == "flower-simulation":
        from cotune.runtime.flower.simulation import run_on_simulation

        run_on_simulation(runs, console, **options)
    else:
        from cotune.runtime.flower.deploy import run_on_flower

        run_on_flower(runs, console, **options)


def has_client_step(cfg: ExperimentConfig) -> bool:
    """Whether the variant has a client step (what runs on SuperNodes); centralized and zero_shot do not."""
    return not cfg.is_cotuning or plan_of(cfg.algorithm).local_training


def discard_unstarted(dirs: list[Path]) -> None:
    """Remove run directories this call created that hold nothing but their config.yaml.

    A model, data or LoRA-target error found while loading then leaves no half-made run behind.
    """
    for d in dirs:
        if d.is_dir() and {p.name for p in d.iterdir()} <= {"config.yaml", LOCK_FILE}:
            for name in ("config.yaml", LOCK_FILE):
                (d / name).unlink(missing_ok=True)
            d.rmdir()


def run_embedded(
    variants: list[ExperimentConfig],
    dirs: list[Path],
    console: Console,
    resume: Sequence[bool] | None = None,
) -> None:
    """The variants in this process, on one loaded base model (or pair) and one data split; `resume[i]`:
    variant i continues from its checkpoint (default: every variant starts)."""
    if not variants:
        return
    resumed = list(resume) if resume is not None else [False] * len(variants)
    if variants[0].is_cotuning:
        run_fedcollm_family(variants, dirs, console, resumed)
    else:
        run_personalized(variants, dirs, console, resumed)


def run_personalized(
    variants: list[ExperimentConfig], dirs: list[Path], console: Console, resume: Sequence[bool]
) -> None:
    cfg = variants[0]
    base, tokenizer, device = load_model(cfg, console=console)
    data = load_windows(cfg, tokenizer, console)
    for d, v, resumed in zip(dirs, variants, resume, strict=True):
        console.print(f"[bold]strategy {v.strategy.name}[/] -> {d}")
        base = run_personalized_variant(v, d, base, data, device, console, resumed)


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
        cfg,
        clients,
        pool.initial,
        lambda s, p: pool.save(slot, p, s),
        RunFiles(run_dir, cfg),
        console,
        pool.base_bytes(),
    )
    try:
        loop.run(resume)
    finally:
        base = pool.unload()
    return base


def run_fedcollm_family(
    variants: list[ExperimentConfig], dirs: list[Path], console: Console, resume: Sequence[bool]
) -> None:
    """FedCoLLM and its baselines: load the SLM (and the LLM once, if any variant needs it)."""
    cfg = variants[0]
    slm_base, llm_base, tokenizer, device = load_fedcollm_models(
        cfg, console, any(needs_llm(v) for v in variants)
    )
    task = load_task(cfg, tokenizer, console)
    eval_cache: dict = {}  # one base model per role and one test split: scores carry across variants
    for d, v, resumed in zip(dirs, variants, resume, strict=True):
        console.print(f"[bold]algorithm {v.algorithm}[/] -> {d}")
        slm, llm = fedcollm_pools(v, slm_base, llm_base)
        clients = InProcessClients(v, fedcollm_works(v, slm, task, device, len(tokenizer)))
        server = fedcollm_server(v, slm, llm, task, tokenizer, device)
        FedCoLLMLoop(v, clients, server, task, RunFiles(d, v), console, eval_cache).run(resumed)
        slm_base = slm.unload()
        if llm is not None:
            llm_base = llm.unload()


def run_status(run_dir: Path, cfg: ExperimentConfig) -> str:
    """One of: "complete" (last round checkpointed, end recorded), "resumable" (an intact checkpoint
    to continue from) or "unstarted" (nothing completed)."""
    found = newest_intact(run_dir) if (run_dir / "config.yaml").is_file() else None
    if found is None:
        return "unstarted"
    if found[0] < 0:
        raise ResumeError(
            f"every checkpoint in {run_dir} is damaged ({', '.join(found[3])}): remove "
            f"{run_dir / 'checkpoints'} to start that run over"
        )
    last = cfg.federation.rounds if not cfg.is_cotuning or plan_of(cfg.algorithm).trains else 0
    path = run_dir / METRICS_FILE
    records = map(parse_record, read_metrics(path)) if path.is_file() else iter(())
    events = [r for r in records if isinstance(r, RunEvent)]
    ended = bool(events) and events[-1].event == "end"
    return "complete" if ended and found[0] == last and not found[3] else "resumable"


def resume_experiment(
    run_dir: Path,
    console: Console | None = None,
    overrides: Sequence[str] = (),
    backend: str = "flower",
    **flower: Any,
) -> list[Path]:
    """Finish a run and every `run.compare` sibling: each continues after its newest intact
    checkpoint, on the backend the run used; one with nothing completed starts over in place; a
    complete one is left as it is. The ones that run in this process run in one call, on one model
    load (and FedCoLLM's shared test scores). `overrides` may change only how it runs (`RUNTIME_SETTINGS`).
    A Flower run resumes on Flower (`backend`: "flower", a deployment, or "flower-simulation";
    `flower`: that backend's options), its SuperNodes reloading their trainer states from their own
    state-dir. Returns the run directories.
    """
    console = console or Console(stderr=True)
    cfg = resume_config(run_dir, overrides)
    confine_caches(run_dir)
    check_trackers(cfg.run.loggers)
    on_flower = is_flower_run(run_dir)
    if not on_flower and any(flower.get(k) is not None for k in ("superlink", "root_certificates")):
        raise ResumeError(f"{run_dir} ran in one process (embedded): resume it without Flower options")
    dirs = comparison_dirs(run_dir, cfg)
    todo: list[tuple[Path, ExperimentConfig, str]] = []
    for d, v in zip(dirs, [cfg] + [variant(cfg, s) for s in baseline_names(cfg)], strict=True):
        status = run_status(d, v)
        if status != "unstarted":  # another config's checkpoint: refused before loading anything
            RunFiles(d, v).open_latest(warn=False)
        if status == "complete":
            console.print(f"{d}: already complete")
        else:
            if status == "unstarted":
                console.print(f"{d}: no completed round yet, starting it over")
            todo.append((d, v, status))
    remote = [(d, v, status) for d, v, status in todo if on_flower and has_client_step(v)]
    local = [run for run in todo if run not in remote]
    for d, v, status in remote:
        prepare_resumed_dir(d, v, status)
        require_flwr()
        run_federated(backend, [(d.resolve(), v)], console, resume=status == "resumable", **flower)
    if local:
        check_data(cfg)  # every data problem at once, before any model loads
    with ExitStack() as held:
        for d, v, status in local:
            held.enter_context(run_lock(d))
            prepare_resumed_dir(d, v, status)
        resumed = [status == "resumable" for _, _, status in local]
        run_embedded([v for _, v, _ in local], [d for d, _, _ in local], console, resumed)
    return dirs


def prepare_resumed_dir(d: Path, v: ExperimentConfig, status: str) -> None:
    """A run directory about to continue: an unstarted one loses its abandoned records and gets its
    config; a resumable one records this resume's runtime settings (the rest stays as written)."""
    if status == "unstarted":
        (d / METRICS_FILE).unlink(missing_ok=True)
    d.mkdir(parents=True, exist_ok=True)
    if status == "unstarted":
        (d / "config.yaml").write_text(dump_config(v))
    else:
        record_runtime_settings(d / "config.yaml", v)
