"""What the embedded runtimes do around a client's round work and at the aggregation point.

* `run_client`: one client's work with injected faults (`simulation.faults`), exceptions caught and
  `federation.client_timeout` enforced. A simulated client runs in-process, so the limit is checked
  when its work returns: a client whose work took longer (wall time, plus any injected delay) is
  dropped from that round exactly as if it had not answered. A dropped client keeps the adapter it
  started the round with and is asked again next round.
* `require`: too few clients left stops the run cleanly (`TooFewClients`) before anything of the
  round is checkpointed, so the last checkpoint stays the resumable state.

The aggregation point itself (screening, clipping, noise, aggregators) is `runtime.pipeline`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cotune.algorithms.attacks import attack_upload
from cotune.config.schema import ExperimentConfig
from cotune.records import FaultRecord, Record, RunEvent
from cotune.seeds import torch_generator
from cotune.state import AdapterState

Log = Callable[[Record], None]


class SimulatedFault(RuntimeError):
    """A fault injected by `simulation.faults`."""


class TooFewClients(RuntimeError):
    """Fewer clients than `federation.min_clients` are left: the run stops, its last checkpoint intact."""


@dataclass
class ClientOutcome:
    ok: bool
    value: Any = None
    reason: str | None = None
    seconds: float = 0.0


def run_client(cfg: ExperimentConfig, round_: int, client: int, work: Callable[[], Any]) -> ClientOutcome:
    """Run one client's round work; a raise, an injected fault or a timeout makes it not ok."""
    faults = [
        f for f in cfg.simulation.faults if f.client == client and (f.rounds is None or round_ in f.rounds)
    ]
    t0 = time.perf_counter()
    try:
        for f in faults:
            if f.kind == "error":
                raise SimulatedFault(f"injected fault (simulation.faults) in round {round_}")
        value = work()
    except Exception as exc:
        return ClientOutcome(False, reason=raised(exc), seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0 + sum(f.seconds for f in faults if f.kind == "delay")
    limit = cfg.federation.client_timeout
    if limit is not None and seconds > limit:
        return ClientOutcome(
            False, value, f"took {seconds:.2f}s, over federation.client_timeout {limit:g}s", seconds
        )
    return ClientOutcome(True, value, seconds=seconds)


def raised(exc: Exception) -> str:
    return f"raised {type(exc).__name__}: {exc}"


def run_clients_together(
    clients: Sequence[int], work: Callable[[], Sequence[Any]]
) -> dict[int, ClientOutcome]:
    """Run several clients' shared work (federation.parallel_clients), one value per client: a raise
    fails every one of them. Injected faults and timeouts are per client, so the config refuses them
    with shared work."""
    t0 = time.perf_counter()
    try:
        values = work()
    except Exception as exc:
        seconds = time.perf_counter() - t0
        return {c: ClientOutcome(False, reason=raised(exc), seconds=seconds) for c in clients}
    seconds = time.perf_counter() - t0
    return {c: ClientOutcome(True, v, seconds=seconds) for c, v in zip(clients, values, strict=True)}


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


def is_attacker(cfg: ExperimentConfig, client: int, round_: int) -> bool:
    a = cfg.simulation.attack
    return client in a.clients and round_ >= a.start_round


def attacked(
    cfg: ExperimentConfig, round_: int, client: int, upload: AdapterState, reference: AdapterState
) -> AdapterState:
    """What a simulated attacker uploads instead of `upload` (seeded by run.seed, round and client)."""
    a = cfg.simulation.attack
    g = torch_generator("attack", cfg.run.seed, round_, client)
    return attack_upload(a.kind, upload, reference, a.scale, g)
