"""What the embedded runtimes do around a client's round work and at the aggregation point.

* `run_client`: one client's work with injected faults (`simulation.faults`), exceptions caught and
  `federation.client_timeout` enforced. A simulated client runs in-process, so the limit is checked
  when its work returns: a client whose work took longer (wall time, plus any injected delay) is
  dropped from that round exactly as if it had not answered. A dropped client keeps the adapter it
  started the round with and is asked again next round.
* `screen_and_clip`: the server's checks on uploads (`robustness.max_update_norm`, keys, shapes,
  NaN/Inf; see `cotune.algorithms.robust`), then DP clipping (`privacy.clip_norm`). Rejections are
  logged to metrics.jsonl as `{"type": "fault", "event": "update_rejected", "client", "reason"}`.
* `require`: too few clients left stops the run cleanly (`TooFewClients`) before anything of the
  round is checkpointed, so the last checkpoint stays the resumable state.

* `screened_aggregate`: the whole personalized aggregation point (screen, clip, noise, mix); the
  embedded runtime and the Flower server both call it, so neither has its own copy.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cotune.algorithms.attacks import attack_upload
from cotune.algorithms.personalized import TrustEvidence, aggregate
from cotune.algorithms.privacy import add_gaussian_noise, clip_uploads, epsilon_spent, noise_std
from cotune.algorithms.robust import screen_updates
from cotune.config.schema import ExperimentConfig

AdapterState = dict[str, torch.Tensor]
Log = Callable[[dict[str, Any]], None]


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


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded from `parts`: reproducible, and independent of the global RNG."""
    return torch.Generator().manual_seed(_seed(*parts))


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
        reason = f"raised {type(exc).__name__}: {exc}"
        return ClientOutcome(False, reason=reason, seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0 + sum(f.seconds for f in faults if f.kind == "delay")
    limit = cfg.federation.client_timeout
    if limit is not None and seconds > limit:
        return ClientOutcome(
            False, value, f"took {seconds:.2f}s, over federation.client_timeout {limit:g}s", seconds
        )
    return ClientOutcome(True, value, seconds=seconds)


def log_dropped(log: Log, round_: int, client: int, reason: str, phase: str = "train") -> None:
    log(
        {
            "type": "fault",
            "event": "client_dropped",
            "round": round_,
            "phase": phase,
            "client": client,
            "reason": reason,
            "time": time.time(),
        }
    )


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
        log({"type": "run", "event": "stopped", "round": round_, "reason": message, "time": time.time()})
        raise TooFewClients(message)


def is_attacker(cfg: ExperimentConfig, client: int, round_: int) -> bool:
    a = cfg.simulation.attack
    return client in a.clients and round_ >= a.start_round


def attacked(
    cfg: ExperimentConfig, round_: int, client: int, upload: AdapterState, reference: AdapterState
) -> AdapterState:
    """What a simulated attacker uploads instead of `upload` (seeded by run.seed, round and client)."""
    a = cfg.simulation.attack
    g = generator("attack", cfg.run.seed, round_, client)
    return attack_upload(a.kind, upload, reference, a.scale, g)


def screen_and_clip(
    cfg: ExperimentConfig,
    log: Log,
    round_: int,
    clients: Sequence[int],
    uploads: Sequence[Mapping[str, torch.Tensor]],
    references: Sequence[Mapping[str, torch.Tensor]],
) -> tuple[list[int], list[AdapterState]]:
    """The clients whose upload is accepted and their uploads (DP-clipped when privacy is on)."""
    positions, rejected = screen_updates(uploads, references, cfg.robustness.max_update_norm)
    for pos, reason in rejected:
        log(
            {
                "type": "fault",
                "event": "update_rejected",
                "round": round_,
                "phase": "aggregate",
                "client": clients[pos],
                "reason": reason,
                "time": time.time(),
            }
        )
    accepted = [clients[p] for p in positions]
    kept = [dict(uploads[p]) for p in positions]
    p = cfg.privacy
    if p.enabled and kept:
        assert p.clip_norm is not None
        kept, norms = clip_uploads(kept, [references[q] for q in positions], p.clip_norm)
        log(
            {
                "type": "privacy",
                "event": "clip",
                "round": round_,
                "clients": accepted,
                "update_norms": [round(x, 6) for x in norms],
                "clipped": sum(x > p.clip_norm for x in norms),
                "clip_norm": p.clip_norm,
            }
        )
    return accepted, kept


def privacy_generator(cfg: ExperimentConfig, round_: int, stream: object = 0) -> torch.Generator:
    seed = cfg.privacy.seed
    if seed is None:
        return torch.Generator().manual_seed(secrets.randbits(63))
    return generator("privacy", seed, round_, stream)


def dp_noise(
    cfg: ExperimentConfig,
    round_: int,
    state: Mapping[str, torch.Tensor],
    max_weight: float,
    stream: object = 0,
) -> AdapterState:
    """state + N(0, (noise_multiplier * clip_norm * max_weight)^2): Gaussian mechanism on a weighted sum."""
    p = cfg.privacy
    assert p.clip_norm is not None
    std = noise_std(p.clip_norm, p.noise_multiplier, max_weight)
    return add_gaussian_noise(state, std, privacy_generator(cfg, round_, stream))


def log_privacy(cfg: ExperimentConfig, log: Log, round_: int, noise: str) -> None:
    """Epsilon spent after `round_` aggregations at privacy.delta (q = 1: every client asked every round)."""
    p = cfg.privacy
    eps = epsilon_spent(p.noise_multiplier, 1.0, round_, p.delta)
    log(
        {
            "type": "privacy",
            "event": "spent",
            "round": round_,
            "epsilon": eps if eps != float("inf") else None,
            "delta": p.delta,
            "noise_multiplier": p.noise_multiplier,
            "clip_norm": p.clip_norm,
            "sample_rate": 1.0,
            "noise": noise,
        }
    )


def screened_aggregate(
    cfg: ExperimentConfig,
    log: Log,
    round_: int,
    n_clients: int,
    clients: Sequence[int],
    uploads: Sequence[Mapping[str, torch.Tensor]],
    references: Sequence[Mapping[str, torch.Tensor]],
    evidence: Callable[[list[int], list[AdapterState]], tuple[list[int], TrustEvidence]],
) -> tuple[list[int], torch.Tensor, list[AdapterState]]:
    """Screen and clip `uploads`, add DP noise, then mix with the configured strategy.

    `evidence(accepted, adapters)` gathers the strategy's evidence on what was uploaded (after
    clipping and per-upload noise) and returns the clients it could gather it from (a subset of
    `accepted`, in order) with the evidence about them. Returns those members, the trust matrix among
    them and their mixed adapters; a client left out keeps its own adapter (the caller's business).
    """
    accepted, adapters = screen_and_clip(cfg, log, round_, clients, uploads, references)
    require(cfg, log, round_, len(accepted), n_clients, "sent an acceptable update", default=1)
    central = cfg.strategy.name == "fedavg"  # a mean: one noise draw on it; else noise on each upload
    if cfg.privacy.enabled and not central:
        adapters = [dp_noise(cfg, round_, a, 1.0, stream=i) for i, a in zip(accepted, adapters, strict=True)]
    members, ev = evidence(accepted, adapters)
    kept = [adapters[accepted.index(i)] for i in members]
    rob = cfg.robustness
    trust, mixed = aggregate(cfg.strategy, kept, ev, rob.aggregator, rob.trim_fraction)
    if cfg.privacy.enabled and central:
        noised = dp_noise(cfg, round_, mixed[0], 1.0 / len(mixed))
        mixed = [{k: v.clone() for k, v in noised.items()} for _ in mixed]
    if cfg.privacy.enabled:
        where = "central: on the mean of clipped updates" if central else "on each clipped upload"
        log_privacy(cfg, log, round_, where)
    return members, trust, mixed
