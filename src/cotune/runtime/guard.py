"""One simulated client's round work, guarded: what the embedded runtime does around it.

* `run_client`: one client's work with injected faults (`runtime.simulated`), exceptions caught and
  `federation.client_timeout` enforced. A simulated client runs in-process, so the limit is checked
  when its work returns: a client whose work took longer (wall time, plus any injected delay) is
  dropped from that round exactly as if it had not answered. A dropped client keeps the adapter it
  started the round with and is asked again next round.
* `run_clients_together`: several clients' shared work (`federation.parallel_clients`).

Too few clients left is `runtime.quorum`; the aggregation point (screening, clipping, noise,
aggregators) is `runtime.pipeline`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cotune.config.schema import ExperimentConfig
from cotune.runtime.simulated import injected_delay, injected_faults, raise_injected


@dataclass
class ClientOutcome:
    ok: bool
    value: Any = None
    reason: str | None = None
    seconds: float = 0.0


def run_client(cfg: ExperimentConfig, round_: int, client: int, work: Callable[[], Any]) -> ClientOutcome:
    """Run one client's round work; a raise, an injected fault or a timeout makes it not ok."""
    faults = injected_faults(cfg, client, round_)
    t0 = time.perf_counter()
    try:
        raise_injected(faults, round_)
        value = work()
    except Exception as exc:
        return ClientOutcome(False, reason=raised(exc), seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0 + injected_delay(faults)
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
