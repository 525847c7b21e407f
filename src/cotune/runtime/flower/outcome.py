"""How a Flower run ended, and why it did not complete, in words a user can act on.

The ServerApp writes its last run event to the run's metrics and, as `OUTCOME_MARK`, to its log (for
a run directory on another machine); `check_outcome` reads it and raises `FlowerRunError` naming the
cause (the SuperLink unreachable, authentication, a SuperNode lost or raising), never a ClientApp's
own error text (it could quote data).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cotune.layout import METRICS_FILE
from cotune.reporting.metrics import read_metrics
from cotune.runtime.flower import FlowerRunError

OUTCOME_MARK = "cotune-outcome: "  # the ServerApp's last line, for runs whose directory is on another machine


def run_outcome(run_dir: Path, log_path: Path | None = None) -> dict[str, Any]:
    """The last run event the ServerApp wrote (end, stopped, failed), from metrics.jsonl or else its log."""
    path = run_dir / METRICS_FILE
    if path.exists():
        events = [m for m in read_metrics(path) if m.get("type") == "run"]
        if events:
            return events[-1]
    if log_path is not None and log_path.exists():
        marks = [
            ln.split(OUTCOME_MARK, 1)[1] for ln in log_path.read_text().splitlines() if OUTCOME_MARK in ln
        ]
        for text in reversed(marks):
            try:
                outcome = json.loads(text)
            except json.JSONDecodeError:
                continue
            if outcome.get("run_dir") == str(run_dir):
                return outcome
    return {"event": None}


def check_outcome(run_dir: Path, log_path: Path | None = None) -> None:
    """Raise FlowerRunError, naming the cause and what to do, unless the run completed."""
    outcome = run_outcome(run_dir, log_path)
    event = outcome.get("event")
    if event == "end":
        return
    where = f" (log: {log_path})" if log_path else ""
    if event == "stopped":
        causes = node_causes(run_dir)
        raise FlowerRunError(
            f"{run_dir}: the run stopped: {outcome.get('reason')}; "
            f"last complete checkpoint: round {outcome.get('last_checkpoint')}"
            + (f". {causes}" if causes else "")
            + where
        )
    if event == "failed":
        raise FlowerRunError(f"{run_dir}: the ServerApp failed: {outcome.get('error')}{where}")
    cause = log_cause(log_path.read_text(errors="replace") if log_path and log_path.exists() else "")
    raise FlowerRunError(
        f"{run_dir}: the ServerApp did not complete the run{': ' + cause if cause else ''}{where}"
    )


# ---- why a Flower run did not complete --------------------------------------------------------------
# What `flwr run` (flwr 1.41, flwr/cli/utils.py) prints for a SuperLink it cannot reach or that refuses it.
FLWR_UNAVAILABLE = "Connection to the SuperLink is unavailable"
FLWR_AUTH_FAILED = "Authentication failed"
LOG_CAUSES = (
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the SuperLink's TLS certificate did not verify against the CA certificate given "
        "(--root-certificates): give the CA that signed the SuperLink's certificate",
    ),
    (
        FLWR_UNAVAILABLE,
        "flwr run could not reach the SuperLink (connection refused, unreachable, or a TLS mismatch: "
        "--root-certificates for a SuperLink started with --ssl-*, none for one started with --insecure); "
        "check --superlink HOST:PORT and that the SuperLink runs there",
    ),
    (
        FLWR_AUTH_FAILED,
        "the SuperLink refused this client (authentication failed): it requires a Flower account; "
        "log in with `flwr login` or submit from a machine the SuperLink admits",
    ),
)
# The classes of a node's failure, by the reasons FlowerClients gives (clients.py): what to do for each.
NODE_CAUSES = (
    (
        "joined",
        "not joined: a SuperNode that never joins is not started, points at another --superlink, is "
        "not registered (`flwr supernode register KEY.pub`, with --enable-supernode-auth) or does not "
        "trust the SuperLink's CA (--root-certificates): see its log, or raise --connect-timeout",
    ),
    (
        "unavailable",
        "lost: the SuperLink reports the SuperNode gone (stopped, or its connection dropped)",
    ),
    (
        "no reply within",
        "lost: the SuperNode did not answer within federation.client_timeout (disconnected, or slower "
        "than the timeout)",
    ),
    ("error reply", f"failed: the SuperNode's ClientApp raised (see the fault records in {METRICS_FILE})"),
)


def log_cause(text: str) -> str | None:
    """What the `flwr run` log says went wrong, in words, or None when it names no known cause."""
    return next((cause for mark, cause in LOG_CAUSES if mark in text), None)


def node_causes(run_dir: Path) -> str:
    """The clients dropped in the last round that lost any (where the run stopped), by cause, with what
    to do; then how to continue. Only cotune's own classes are named, never a ClientApp's error text
    (it could quote data)."""
    path = run_dir / METRICS_FILE
    dropped = [
        m
        for m in (read_metrics(path) if path.exists() else [])
        if m.get("type") == "fault" and m.get("event") == "client_dropped"
    ]
    faults = [m for m in dropped if m.get("round") == dropped[-1].get("round")] if dropped else []
    by_cause: dict[str, list[int]] = {}
    for f in faults:
        reason = str(f.get("reason", ""))
        cause = next((c for mark, c in NODE_CAUSES if mark in reason), f"failed (see {METRICS_FILE})")
        by_cause.setdefault(cause, []).append(int(f.get("client", -1)))
    parts = [f"client(s) {', '.join(map(str, sorted(set(cs))))} {cause}" for cause, cs in by_cause.items()]
    if not parts:
        return ""
    return (
        "; ".join(parts)
        + ". Start the missing SuperNodes (same partition-id and state-dir), then continue with "
        f"`cotune run --resume {run_dir} --backend flower`"
    )
