"""Too few clients left: `federation.min_clients`, and the record of a dropped client.

`require` stops the run cleanly (`TooFewClients`) before anything of the round is checkpointed, so the
last checkpoint stays the resumable state; both loops, every transport and the aggregation pipeline
(accepted uploads) ask it.
"""

from __future__ import annotations

from collections.abc import Callable

from cotune.config.schema import ExperimentConfig
from cotune.records import FaultRecord, Record, RunEvent

Log = Callable[[Record], None]


class TooFewClients(RuntimeError):
    """Fewer clients than `federation.min_clients` are left: the run stops, its last checkpoint intact."""


def log_dropped(log: Log, round_: int, client: int, reason: str, phase: str = "train") -> None:
    log(FaultRecord(event="client_dropped", round=round_, phase=phase, client=client, reason=reason))


def require(
    cfg: ExperimentConfig, log: Log, round_: int, have: int, total: int, what: str, default: int | None = None
) -> None:
    """Stop the run when fewer than federation.min_clients are left.

    Unset, min_clients means every client must answer (`default` None); for accepted updates the
    runtimes pass default=1: a rejected update is skipped while at least one is left.
    """
    m = cfg.federation.min_clients
    need = min(m, total) if m is not None else (total if default is None else default)
    if have < need:
        shown = m if m is not None else f"unset (needs {need})"
        message = (
            f"round {round_}: only {have} of {total} clients {what}, federation.min_clients is "
            f"{shown}; the run stops here, resumable from its last checkpoint"
        )
        log(RunEvent(event="stopped", round=round_, reason=message))
        raise TooFewClients(message)
