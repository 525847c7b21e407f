"""Simulated attackers and injected faults (`simulation.attack`, `simulation.faults`), in one place.

The embedded runtime's clients can be told to misbehave, to test the defences (screening, clipping,
robust aggregators, `min_clients`, `client_timeout`). Who misbehaves, when, and how is decided here;
the transports and the client setup only call these functions.

Attacks (`simulation.attack`; with Delta = honest upload - reference, the adapter the client started
the round from), an attacker from `start_round` on:

* `noise`: uploads reference + Gaussian noise whose per-tensor RMS is `scale` times that of Delta
  (a random update of `scale` times the honest magnitude);
* `sign_flip`: reference - scale * Delta (pushes the model away from where training went);
* `scale`: reference + scale * Delta (an honest direction, blown up);
* `nan`: all NaN (a broken client; the server's screening must reject it);
* `garbage_data`: trains honestly on random tokens (`garbage_tokens` replaces its training data once,
  at the start);
* `inflated_claim`: claims 10^9 examples (its FedAvg weight).

Faults (`simulation.faults`): a client's round work raises (`error`), or takes `seconds` longer
(`delay`, counted against `federation.client_timeout`); `guard.run_client` applies them.
Every random draw is seeded by run.seed (`cotune.seeds`: the `attack` and `garbage` streams).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from cotune.config.names import UPLOAD_ATTACKS, AttackKind
from cotune.config.schema import ExperimentConfig, FaultConfig
from cotune.data.task_data import EncodedSet
from cotune.evaluation.lm import IGNORE_INDEX
from cotune.seeds import torch_generator
from cotune.state import AdapterState

CLAIM = 10**9  # the example count a simulated `inflated_claim` attacker reports


class SimulatedFault(RuntimeError):
    """A fault injected by `simulation.faults`."""


# ---- attacks: pure transforms -----------------------------------------------------------------------
def attack_upload(
    kind: AttackKind,
    upload: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    scale: float,
    generator: torch.Generator | None = None,
) -> AdapterState:
    """The attacker's upload, from its honest `upload` and the round's `reference`."""
    out: AdapterState = {}
    for k, ref in reference.items():
        u = upload[k]
        delta = u.detach().float() - ref.detach().float()
        if kind == "noise":
            rms = float(delta.pow(2).mean().sqrt()) if delta.numel() else 0.0
            rms = rms if rms > 0 else float(ref.float().pow(2).mean().sqrt()) or 1.0
            noise = torch.randn(delta.shape, generator=generator, dtype=torch.float32).to(delta.device)
            new = ref.float() + noise * (scale * rms)
        elif kind == "sign_flip":
            new = ref.float() - scale * delta
        elif kind == "scale":
            new = ref.float() + scale * delta
        elif kind == "nan":
            new = torch.full_like(delta, float("nan"))
        elif kind == "garbage_data":
            new = u.detach().float()
        else:
            raise ValueError(
                f"unknown attack {kind!r}; expected noise, sign_flip, scale, nan or garbage_data"
            )
        out[k] = new.to(u.dtype)
    return out


def garbage_tokens(
    ids: Tensor, vocab_size: int, generator: torch.Generator | None = None, mask: Tensor | None = None
) -> Tensor:
    """`ids` with every position (or those where `mask` is true) replaced by uniform random token ids."""
    random = torch.randint(0, vocab_size, ids.shape, generator=generator, dtype=ids.dtype)
    return random if mask is None else torch.where(mask.bool(), random, ids)


# ---- who attacks, when -----------------------------------------------------------------------------
def is_attacker(cfg: ExperimentConfig, client: int, round_: int) -> bool:
    a = cfg.simulation.attack
    return client in a.clients and round_ >= a.start_round


def uploaded(
    cfg: ExperimentConfig, round_: int, client: int, upload: AdapterState, reference: AdapterState
) -> AdapterState:
    """What the client uploads in this round: `upload`, or what a simulated attacker sends instead."""
    a = cfg.simulation.attack
    if not is_attacker(cfg, client, round_) or a.kind not in UPLOAD_ATTACKS:
        return upload
    return attacked(cfg, round_, client, upload, reference)


def attacked(
    cfg: ExperimentConfig, round_: int, client: int, upload: AdapterState, reference: AdapterState
) -> AdapterState:
    """What a simulated attacker uploads instead of `upload` (seeded by run.seed, round and client)."""
    a = cfg.simulation.attack
    g = torch_generator("attack", cfg.run.seed, round_, client)
    return attack_upload(a.kind, upload, reference, a.scale, g)


def is_garbage_attacker(cfg: ExperimentConfig, index: int) -> bool:
    a = cfg.simulation.attack
    return a.kind == "garbage_data" and index in a.clients


def garbage_data(
    cfg: ExperimentConfig, index: int, ids: Tensor, vocab: int, mask: Tensor | None = None
) -> Tensor:
    """A `garbage_data` attacker's training tokens (the positions `mask` marks, or all), once, at setup."""
    return garbage_tokens(ids, vocab, torch_generator("garbage", cfg.run.seed, index), mask=mask)


def garbage_examples(cfg: ExperimentConfig, index: int, data: EncodedSet, vocab: int) -> EncodedSet:
    """A `garbage_data` attacker's examples: random tokens where the rows have tokens, trained on where
    they were (the answer or the response): the same shapes and loss positions as the honest set."""
    ids = garbage_data(cfg, index, data.input_ids, vocab, mask=data.attention_mask)
    return EncodedSet(ids, data.attention_mask, torch.where(data.labels != IGNORE_INDEX, ids, data.labels))


def claims_inflated(cfg: ExperimentConfig, client: int) -> bool:
    """Whether the client is an `inflated_claim` attacker (it reports CLAIM examples)."""
    a = cfg.simulation.attack
    return a.kind == "inflated_claim" and client in a.clients


# ---- injected faults ---------------------------------------------------------------------------------
def injected_faults(cfg: ExperimentConfig, client: int, round_: int) -> list[FaultConfig]:
    """The faults `simulation.faults` injects into this client's work in this round."""
    return [
        f for f in cfg.simulation.faults if f.client == client and (f.rounds is None or round_ in f.rounds)
    ]


def raise_injected(faults: list[FaultConfig], round_: int) -> None:
    """An `error` fault: the client's round work raises before it starts."""
    if any(f.kind == "error" for f in faults):
        raise SimulatedFault(f"injected fault (simulation.faults) in round {round_}")


def injected_delay(faults: list[FaultConfig]) -> float:
    """The seconds `delay` faults add to the client's round work."""
    return sum(f.seconds for f in faults if f.kind == "delay")
