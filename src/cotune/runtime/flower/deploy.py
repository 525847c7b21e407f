"""`cotune run CONFIG --backend flower`: check the config, then run each variant on Flower.

`run_on_flower` is what the backend registry (`runtime/backends.py`) calls once the orchestrator has
prepared the run directories: on a local federation (`federation.py`) or a running SuperLink
(`probe.py`, `app.submit`), each run's outcome checked (`outcome.py`); it raises if the server
stopped or failed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from cotune.config.loader import dump_config
from cotune.config.schema import ExperimentConfig
from cotune.layout import FLOWER_DIR, FLWR_RUN_LOG
from cotune.runtime.flower import FlowerRunError
from cotune.runtime.flower.app import APP_NAME, Progress, submit, write_app_dir, write_connection
from cotune.runtime.flower.federation import LocalFederation
from cotune.runtime.flower.outcome import check_outcome
from cotune.runtime.flower.probe import probe_superlink


# ---- the entry point for `cotune run --backend flower` ---------------------------------------------------
def check_flower_config(cfg: ExperimentConfig) -> None:
    """Refuse, before any process starts, what cannot run on SuperNodes (SecAgg+ where it cannot apply,
    clients trained together: each SuperNode holds one client)."""
    if cfg.federation.parallel_clients > 1:
        raise FlowerRunError(
            f"federation.parallel_clients {cfg.federation.parallel_clients} trains several simulated clients "
            "of one process together; on Flower each SuperNode (or simulation actor) holds one client: set "
            "federation.parallel_clients: 1, or use --backend embedded"
        )
    if not cfg.federation.secure_aggregation:
        return
    from cotune.algorithms.fedcollm import PLANS  # torch: only where a run is about to start

    averaged = [name for name, plan in PLANS.items() if plan.local_training and plan.aggregate]
    if not cfg.is_cotuning or cfg.algorithm not in averaged:
        raise FlowerRunError(
            "federation.secure_aggregation is implemented for the FedAvg step of algorithm "
            f"{' or '.join(averaged)} (FedCoLLM family), not for {cfg.algorithm}/{cfg.strategy.name}"
        )
    rob = cfg.robustness
    if rob.max_update_norm is not None or rob.aggregator != "mean" or cfg.privacy.enabled:
        raise FlowerRunError(
            "federation.secure_aggregation hides the individual uploads, so they cannot be screened "
            "(robustness.max_update_norm), robustly aggregated (robustness.aggregator) or clipped "
            "(privacy.clip_norm): turn those off"
        )


def run_on_flower(
    runs: Sequence[tuple[Path, ExperimentConfig]],
    console: Console,
    *,
    superlink: str | None = None,
    root_certificates: Path | None = None,
    connect_timeout: float = 120.0,
    timeout: float | None = None,
    resume: bool = False,
) -> None:
    """Run each (run directory, config) on Flower, one after the other; raise if one did not complete.

    With `superlink` (host:port of a running SuperLink's Control API), the runs go to that federation:
    TLS with `root_certificates`, insecure without. Without it, a LocalFederation of
    `federation.clients` SuperNodes on 127.0.0.1 is started for the duration (the demo). Run
    directories are paths on the SuperLink's machine. With `resume`, each run continues after its
    last complete checkpoint (its SuperNodes reload their trainer states from their state-dir).
    """
    if not runs:
        return
    if superlink is not None:  # the cause of a failure to reach it, before anything is written or sent
        probe_superlink(superlink, root_certificates)
    run_dir, cfg = runs[0]
    with tempfile.TemporaryDirectory(prefix="cotune-flower-") as tmp:
        work = run_dir / FLOWER_DIR  # logs of the federation and of `flwr run` stay with the run
        work.mkdir(parents=True, exist_ok=True)
        app_dir = write_app_dir(Path(tmp) / APP_NAME)
        settings: dict[str, Any] = {"connect-timeout": connect_timeout, "resume": resume}
        # min-clients and round-timeout come with the config
        log = work / FLWR_RUN_LOG
        if superlink is None:
            with LocalFederation(cfg.federation.clients, work) as fed:
                console.print(f"local Flower federation: SuperLink {fed.address}, {fed.n_nodes} SuperNodes")
                for d, v in runs:
                    console.print(f"[bold]{_label(v)}[/] on Flower -> {d}")
                    run_config = {"config-yaml": dump_config(v), "run-dir": str(d), **settings}
                    fed.run(app_dir, run_config, timeout, echo=Progress(console))
                    check_outcome(d, log)
            return
        home = Path(tmp) / "flwr-home"
        write_connection(
            home, superlink, insecure=root_certificates is None, root_certificates=root_certificates
        )
        for d, v in runs:
            console.print(f"[bold]{_label(v)}[/] on Flower ({superlink}) -> {d}")
            run_config = {"config-yaml": dump_config(v), "run-dir": str(d), **settings}
            submit(app_dir, home, run_config, log, timeout, echo=Progress(console))
            check_outcome(d, log)


def _label(cfg: ExperimentConfig) -> str:
    return f"algorithm {cfg.algorithm}" if cfg.is_cotuning else f"strategy {cfg.strategy.name}"
