"""`cotune audit RUN_DIR`: what each client's released adapter reveals about its training documents.

For each client of a personalized run, a membership-inference attack (`evaluation.membership_inference`)
on the adapter of the run's newest intact checkpoint: its training windows (or examples) are the
members, its held-out test ones the non-members, equal counts. The data is rebuilt from the run's
config.yaml by the code the run used (`data.client_examples.client_data`: the same split, the same
seed), so nothing of the run needs to have been kept but its config and checkpoints. The reference
model of the calibrated attack is the same base without any adapter (the zero-shot model).

Only counts and figures are printed or written (audit.json), never the text of an example.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from cotune.config.schema import ExperimentConfig
from cotune.data.client_examples import client_data
from cotune.data.preflight import check_data
from cotune.data.windows import ClientData, Rows
from cotune.evaluation.lm import example_losses
from cotune.evaluation.membership_inference import LOW_FPR, Losses, MembershipAudit
from cotune.layout import AUDIT_FILE, METRICS_FILE
from cotune.records import RunEvent, parse_record
from cotune.reporting.files import write_text_atomically
from cotune.reporting.metrics import read_metrics
from cotune.runtime.results import (
    Adapter,
    RunDirError,
    TunedModel,
    checkpoint_adapters,
    load_tuned,
    run_config,
    switch_adapter,
)
from cotune.runtime.rundir import client_name
from cotune.runtime.simulated import is_garbage_attacker

DEFAULT_MAX_EXAMPLES = 256  # members (and as many non-members) per client
REFERENCE = "the run's base model without any adapter (zero-shot)"
ATTACKS = ("loss", "calibrated")  # MembershipAudit's fields, in the order they are shown
FIGURES = tuple((attack, figure) for attack in ATTACKS for figure in ("auc", "tpr_at_1pct_fpr"))


@dataclass(frozen=True)
class AuditPlan:
    """What `cotune audit` will score, all of it checked before the model loads."""

    run_dir: Path
    cfg: ExperimentConfig
    adapters: dict[int, Adapter]  # client -> its adapter in the newest intact checkpoint
    skipped: dict[int, str]  # client -> why it is not audited
    max_examples: int


@dataclass(frozen=True)
class ClientAudit:
    client: int
    audit: MembershipAudit


def plan_audit(run_dir: Path, max_examples: int = DEFAULT_MAX_EXAMPLES) -> AuditPlan:
    """The run's config and every client's adapter, or an ordinary error saying why this run directory
    cannot be audited (no model is loaded)."""
    if max_examples < 1:
        raise ValueError(f"--max-examples {max_examples}: give at least 1")
    cfg = run_config(run_dir)
    refuse_unrebuildable(run_dir, cfg)
    skipped = {
        k: "a simulated garbage_data attacker: it trained on random tokens, not on its documents"
        for k in range(cfg.federation.clients)
        if is_garbage_attacker(cfg, k)
    }
    clients = [k for k in range(cfg.federation.clients) if k not in skipped]
    if not clients:
        raise RunDirError(f"{run_dir}: every client is a simulated attacker; no client's adapter to audit")
    found = checkpoint_adapters(run_dir, cfg, [client_name(k) for k in clients])
    adapters = dict(zip(clients, found, strict=True))
    check_data(cfg)  # the run's data files are still there and readable
    return AuditPlan(run_dir, cfg, adapters, skipped, max_examples)


def refuse_unrebuildable(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Refuse a run whose members and non-members cannot be rebuilt from its config."""
    if cfg.is_cotuning:
        raise RunDirError(
            f"{run_dir} is a FedCoLLM-family run ({cfg.algorithm}): cotune audit reads personalized runs "
            "only. Their clients hold held-out documents of their own; a FedCoLLM client has none, and the "
            "shared test set differs from a client's data in its labels, so comparing them would measure "
            "that skew, not membership"
        )
    if cfg.data.test_fraction == 0:
        raise RunDirError(
            f"{run_dir}: the run has no held-out documents (data.test_fraction 0), so there are no "
            "non-members to compare each client's training documents with; audit a run with a test split"
        )
    if started_on(run_dir) == "flower":
        raise RunDirError(
            f"{run_dir} ran on a Flower deployment, whose SuperNodes may have trained on their own files "
            "(data-path) that this machine does not hold, so its members cannot be rebuilt from "
            "config.yaml; audit the same config run embedded or with --backend flower-simulation"
        )


def started_on(run_dir: Path) -> str | None:
    """The backend of the run's start record (None: no metrics, or no start record)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    for line in read_metrics(path):
        record = parse_record(line)
        if isinstance(record, RunEvent) and record.event == "start":
            return record.backend
    return None


def spread_rows(n_rows: int, n: int) -> torch.Tensor:
    """`n` of `n_rows` row indices spread evenly from the first to the last (all when n >= n_rows): a
    deterministic sample that draws on no random stream."""
    if n >= n_rows:
        return torch.arange(n_rows)
    return torch.linspace(0, n_rows - 1, n).round().long()


def losses_of(tuned: TunedModel, data: Rows, rows: torch.Tensor) -> Losses:
    """The rows' losses under the active adapter and under the base with the adapter disabled."""
    model, batch = tuned.pool.model, tuned.cfg.train.eval_batch_size
    target = example_losses(model, data, rows, batch)
    with model.disable_adapter():
        reference = example_losses(model, data, rows, batch)
    return Losses(target, reference)


def audit_client(tuned: TunedModel, client: int, data: ClientData, max_examples: int) -> MembershipAudit:
    """One client: its training rows against as many of its test rows (at most `max_examples` each)."""
    test = data.test
    if test is None or len(test) == 0 or len(data.train) == 0:
        raise RunDirError(
            f"client {client} has no training or no test windows in the rebuilt split: nothing to compare; "
            "audit a run with more documents per client or a larger data.test_fraction"
        )
    n = min(len(data.train), len(test), max_examples)
    members = losses_of(tuned, data.train, spread_rows(len(data.train), n))
    nonmembers = losses_of(tuned, test, spread_rows(len(test), n))
    return MembershipAudit.of(members, nonmembers)


def run_audit(plan: AuditPlan, console: Console | None = None) -> list[ClientAudit]:
    """Load the base once, rebuild the run's client data, and audit each client's adapter."""
    clients = sorted(plan.adapters)
    tuned = load_tuned(plan.adapters[clients[0]], console)
    cfg = plan.cfg
    data = client_data(cfg.data, cfg.federation.clients, tuned.tokenizer, cfg.run.seed)
    results = []
    for k in clients:
        if k != clients[0]:
            tuned = switch_adapter(tuned, plan.adapters[k])
        results.append(ClientAudit(k, audit_client(tuned, k, data.clients[k], plan.max_examples)))
    return results


def checkpoint_round(adapter: Adapter) -> str:
    """The checkpoint folder an adapter was read from (e.g. round-0003)."""
    return adapter.adapter_dir.parent.name


def mean_of(results: Sequence[ClientAudit], attack: str, figure: str) -> float:
    return sum(getattr(getattr(r.audit, attack), figure) for r in results) / len(results)


def audit_document(plan: AuditPlan, results: Sequence[ClientAudit]) -> dict[str, Any]:
    """What audit.json holds: the run's setting and each client's counts and figures (no example text)."""
    cfg = plan.cfg
    privacy = cfg.privacy
    return {
        "strategy": cfg.strategy.name,
        "privacy": (
            {"clip_norm": privacy.clip_norm, "noise_multiplier": privacy.noise_multiplier}
            if privacy.enabled
            else None
        ),
        "checkpoint": checkpoint_round(next(iter(plan.adapters.values()))),
        "members": "each client's training windows (examples); non-members: its test split, equal counts",
        "reference": REFERENCE,
        "max_examples": plan.max_examples,
        "low_fpr": LOW_FPR,
        "clients": [{"client": r.client, **r.audit.as_dict()} for r in results],
        "skipped": [{"client": k, "reason": why} for k, why in sorted(plan.skipped.items())],
        "mean": {
            attack: {figure: mean_of(results, attack, figure) for a, figure in FIGURES if a == attack}
            for attack in ATTACKS
        },
    }


def write_audit(plan: AuditPlan, results: Sequence[ClientAudit]) -> Path:
    """audit.json in the run directory (replaced atomically)."""
    path = plan.run_dir / AUDIT_FILE
    write_text_atomically(path, json.dumps(audit_document(plan, results), indent=2) + "\n")
    return path
