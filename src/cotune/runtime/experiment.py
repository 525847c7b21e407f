"""The orchestrator: from a validated config to finished run directories, on any backend.

It names and creates the run directories (the main run and one sibling per `run.compare` entry) and
hands them to a backend of the registry (`runtime/backends.py`): the variants with a client step to
the chosen backend, the others (centralized, zero_shot) to the embedded one. `--resume` finds where
each run stands and continues it on the backend it ran on. The CLI and the tests call it; nothing
below it imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console

from cotune.algorithms.fedcollm import plan_of
from cotune.caches import confine_caches
from cotune.config.loader import dump_config
from cotune.config.schema import ExperimentConfig
from cotune.data.preflight import check_data
from cotune.layout import CHECKPOINTS_DIR, CONFIG_FILE, LOCK_FILE, METRICS_FILE
from cotune.records import RunEvent, parse_record
from cotune.reporting.metrics import read_metrics
from cotune.reporting.trackers import check_trackers
from cotune.runtime.backends import EMBEDDED, FLOWER, EmbeddedOptions, Options, backend_named, resuming_on
from cotune.runtime.compose import has_client_step
from cotune.runtime.lock import run_lock
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

log = logging.getLogger("cotune")


def run_experiment(
    cfg: ExperimentConfig,
    run_dir: Path | None = None,
    console: Console | None = None,
    backend: str = EMBEDDED.name,
    options: Options | None = None,
) -> list[Path]:
    """Run the configured experiment, then each `run.compare` entry on identical data and init.

    `backend` names one of `runtime.backends.BACKENDS` and `options` are its options (default: its
    defaults); on a Flower backend the variants without a client step run in this process.
    Returns the run directories, the main run first.
    """
    chosen = backend_named(backend)
    options = chosen.checked(options)
    console = console or Console(stderr=True)
    run_dir = run_dir or default_run_dir(cfg)
    confine_caches(run_dir)  # before matplotlib, MLflow or a torch compile cache is first used
    check_trackers(cfg.run.loggers)  # before anything is created
    if cfg.privacy.no_guarantee:
        console.print(f"warning: {cfg.privacy.no_guarantee}", highlight=False, markup=False)
    chosen.check(cfg, options)  # every problem the backend can see, before anything is created
    if chosen.federated:
        run_dir = run_dir.resolve()  # the ServerApp may run elsewhere
    dirs = comparison_dirs(run_dir, cfg)
    pairs = list(zip(dirs, [cfg] + [variant(cfg, s) for s in baseline_names(cfg)], strict=True))
    federated = [(d, v) for d, v in pairs if chosen.federated and has_client_step(v)]
    local = [(d, v) for d, v in pairs if (d, v) not in federated]
    created = [d for d in dirs if not d.exists()]
    try:
        with ExitStack() as held:  # this process writes the local runs (a ServerApp holds its own)
            for d, _ in local:
                held.enter_context(run_lock(d))
            for d, v in pairs:
                init_run_dir(d, v)
            for d, v in local if chosen.federated else []:
                console.print(f"[bold]algorithm {v.algorithm}[/] has no client step: embedded runtime -> {d}")
            EMBEDDED.run(local, console, EmbeddedOptions())
        if federated:
            chosen.run(federated, console, options)
    except BaseException:
        discard_unstarted(created)
        raise
    return dirs


def discard_unstarted(dirs: list[Path]) -> None:
    """Remove run directories this call created that hold nothing but their config.yaml.

    A model, data or LoRA-target error found while loading then leaves no half-made run behind.
    """
    for d in dirs:
        if d.is_dir() and {p.name for p in d.iterdir()} <= {CONFIG_FILE, LOCK_FILE}:
            for name in (CONFIG_FILE, LOCK_FILE):
                (d / name).unlink(missing_ok=True)
            d.rmdir()


def run_status(run_dir: Path, cfg: ExperimentConfig) -> str:
    """One of: "complete" (last round checkpointed, end recorded), "resumable" (an intact checkpoint
    to continue from) or "unstarted" (nothing completed)."""
    found = newest_intact(run_dir) if (run_dir / CONFIG_FILE).is_file() else None
    if found is None:
        return "unstarted"
    if found[0] < 0:
        raise ResumeError(
            f"every checkpoint in {run_dir} is damaged ({', '.join(found[3])}): remove "
            f"{run_dir / CHECKPOINTS_DIR} to start that run over"
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
    backend: str = FLOWER.name,
    options: Options | None = None,
) -> list[Path]:
    """Finish a run and every `run.compare` sibling: each continues after its newest intact
    checkpoint, on the backend the run used; one with nothing completed starts over in place; a
    complete one is left as it is. The ones that run in this process run in one call, on one model
    load (and FedCoLLM's shared test scores). `overrides` may change only how it runs (`RUNTIME_SETTINGS`).
    A Flower run resumes on Flower (`backend`: "flower", a deployment, or "flower-simulation";
    `options`: that backend's), its SuperNodes reloading their trainer states from their own
    state-dir. Returns the run directories.
    """
    chosen = resuming_on(backend)
    options = chosen.checked(options)
    console = console or Console(stderr=True)
    cfg = resume_config(run_dir, overrides)
    confine_caches(run_dir)
    check_trackers(cfg.run.loggers)
    on_flower = is_flower_run(run_dir)
    if not on_flower and options.names_a_federation:
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
        chosen.resume([(d.resolve(), v)], console, options, [status == "resumable"])
    if local:
        check_data(cfg)  # every data problem at once, before any model loads
    with ExitStack() as held:
        for d, v, status in local:
            held.enter_context(run_lock(d))
            prepare_resumed_dir(d, v, status)
        resumed = [status == "resumable" for _, _, status in local]
        EMBEDDED.resume([(d, v) for d, v, _ in local], console, EmbeddedOptions(), resumed)
    return dirs


def prepare_resumed_dir(d: Path, v: ExperimentConfig, status: str) -> None:
    """A run directory about to continue: an unstarted one loses its abandoned records and gets its
    config; a resumable one records this resume's runtime settings (the rest stays as written)."""
    if status == "unstarted":
        (d / METRICS_FILE).unlink(missing_ok=True)
    d.mkdir(parents=True, exist_ok=True)
    if status == "unstarted":
        (d / CONFIG_FILE).write_text(dump_config(v))
    else:
        record_runtime_settings(d / CONFIG_FILE, v)
