"""`cotune audit RUN_DIR`: what each client's released adapter reveals about its training documents.

For each client of a personalized run, a membership-inference attack (`evaluation.membership_inference`)
on the adapter of the run's newest intact checkpoint: its training windows (or examples) are the
members, its held-out test ones the non-members, equal counts. The data is rebuilt from the run's
config.yaml by the code the run used (`data.client_examples.client_data`: the same split, the same
seed), so nothing of the run needs to have been kept but its config and checkpoints. The reference
model of the calibrated attack is the same base without any adapter (the zero-shot model).

Prediction trust also uploads each client's top-k logits on the public set (the evidence), a second
channel. Its attack plants the client's members and non-members in the public set: each is sent as
the client sends its evidence (`runtime.client.release_topk`, in releases of the run's public size,
`strategy.public_batches` x `train.eval_batch_size` rows, so a protected position has the run's
clipping bound), and the server scores each row by the loss its uploaded logits give the row's true
tokens (`evidence_losses`; lower: member). Without protection that is nearly the adapter's own loss
on the row; with the run's `privacy.evidence_clip` (and noise) it is what the protected upload leaves.

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

from cotune.algorithms.privacy import EvidenceProtection
from cotune.config.schema import ExperimentConfig
from cotune.data.client_examples import client_data
from cotune.data.preflight import check_data
from cotune.data.windows import ClientData, Rows
from cotune.evaluation.lm import example_losses
from cotune.evaluation.membership_inference import (
    LOW_FPR,
    AttackResult,
    Losses,
    MembershipAudit,
    evidence_losses,
    evidence_ranks,
)
from cotune.layout import AUDIT_FILE, METRICS_FILE
from cotune.records import RunEvent, parse_record
from cotune.reporting.files import write_text_atomically
from cotune.reporting.metrics import read_metrics
from cotune.runtime.client import release_targets, release_topk
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
class EvidenceAttacks:
    """Both attacks on one client's uploaded logits: the loss they give the true tokens (`evidence_losses`)
    and the true tokens' reciprocal rank among them (`evidence_ranks`: blind to clipping's rescaling)."""

    loss: AttackResult
    rank: AttackResult

    def as_dict(self) -> dict[str, object]:
        return {"loss": self.loss.as_dict(), "rank": self.rank.as_dict()}


@dataclass(frozen=True)
class EvidenceAudit:
    """The attacks on one client's uploaded top-k logits (prediction trust): its members and non-members
    planted in the public set, sent unprotected and as the run protects them (None: it does not)."""

    members: int
    nonmembers: int
    unprotected: EvidenceAttacks
    protected: EvidenceAttacks | None

    def as_dict(self) -> dict[str, object]:
        return {
            "members": self.members,
            "nonmembers": self.nonmembers,
            "unprotected": self.unprotected.as_dict(),
            "protected": None if self.protected is None else self.protected.as_dict(),
        }


@dataclass(frozen=True)
class ClientAudit:
    client: int
    audit: MembershipAudit
    evidence: EvidenceAudit | None = None  # strategies that upload logits


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


def evidence_scores(
    tuned: TunedModel, data: Rows, rows: torch.Tensor, protection: EvidenceProtection | None, at: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's scores (-loss, reciprocal rank) from the top-k logits the active adapter would upload
    with the row planted in the public set, in releases of the run's public size (`release_topk`; `at`
    names the noise of these releases, apart from the run's)."""
    cfg = tuned.cfg
    size, per = cfg.train.eval_batch_size, cfg.strategy.public_batches * cfg.train.eval_batch_size
    losses, ranks = [], []
    for n, start in enumerate(range(0, len(rows), per)):
        chunk = rows[start : start + per]
        batches = [chunk[b : b + size] for b in range(0, len(chunk), size)]
        k, model = cfg.strategy.logits_topk, tuned.pool.model
        sent, _ = release_topk(model, data, batches, k, tuned.device, protection, ("audit", at, n))
        for (v, i), t in zip(sent, release_targets(data, batches), strict=True):
            losses.append(-evidence_losses(v, i, t))
            ranks.append(evidence_ranks(v, i, t))
    return torch.cat(losses), torch.cat(ranks)


def evidence_attack(
    tuned: TunedModel,
    client: int,
    members: Rows,
    nonmembers: Rows,
    n: int,
    protection: EvidenceProtection | None,
) -> EvidenceAttacks:
    """The attacks on one client's uploaded logits (n members and n non-members), sent with `protection`."""
    rows_m, rows_n = spread_rows(len(members), n), spread_rows(len(nonmembers), n)
    m = evidence_scores(tuned, members, rows_m, protection, ("members", client))
    o = evidence_scores(tuned, nonmembers, rows_n, protection, ("nonmembers", client))
    results = [AttackResult.of(a[torch.isfinite(a)], b[torch.isfinite(b)]) for a, b in zip(m, o, strict=True)]
    return EvidenceAttacks(*results)


def audit_evidence(tuned: TunedModel, client: int, members: Rows, nonmembers: Rows, n: int) -> EvidenceAudit:
    """The evidence attack on one client, unprotected and as the run protects its uploads."""
    protection = EvidenceProtection.of(tuned.cfg)
    protected = None
    if protection is not None:
        protected = evidence_attack(tuned, client, members, nonmembers, n, protection)
    unprotected = evidence_attack(tuned, client, members, nonmembers, n, None)
    return EvidenceAudit(min(n, len(members)), min(n, len(nonmembers)), unprotected, protected)


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
        audit = audit_client(tuned, k, data.clients[k], plan.max_examples)
        evidence = None
        if cfg.uploads_logits:
            own = data.clients[k]
            assert own.test is not None  # audit_client refused a client without one
            n = min(len(own.train), len(own.test), plan.max_examples)  # as audit_client does
            evidence = audit_evidence(tuned, k, own.train, own.test, n)
        results.append(ClientAudit(k, audit, evidence))
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
        "evidence": (
            {
                "planted": "each client's members and non-members sent as its public-set top-k logits, "
                "in releases of the run's public size; score: -loss of the row's true tokens from them",
                "protection": (
                    {
                        "evidence_clip": privacy.evidence_clip,
                        "evidence_noise_multiplier": privacy.evidence_noise_multiplier,
                    }
                    if privacy.protects_evidence
                    else None
                ),
            }
            if cfg.uploads_logits
            else None
        ),
        "clients": [
            {
                "client": r.client,
                **r.audit.as_dict(),
                **({"evidence": r.evidence.as_dict()} if r.evidence is not None else {}),
            }
            for r in results
        ],
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
