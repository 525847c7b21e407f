"""The aggregation point, built once from the config: screening, clipping, DP noise, the aggregator.

Both families' round loops call one `AggregationPipeline` whatever transport carried the uploads:
`personalized` (trust-weighted mixing, SPEC B) and `fedavg` (FedCoLLM's step 3, SPEC A). What the
config switches on (robustness.max_update_norm, privacy.clip_norm / noise_multiplier,
robustness.aggregator) is decided here, not by flags tested inside the loops.

* Screening (`cotune.algorithms.robust`): an upload with NaN/Inf, wrong keys or shapes, or an update
  larger than `robustness.max_update_norm` is rejected and logged as
  a `FaultRecord` (event update_rejected).
* Client-level DP: every accepted update is clipped to `privacy.clip_norm`; Gaussian noise goes on
  the mean (fedavg, where one draw covers everyone) or on each upload (trust mixing, where clients
  take different weighted sums); epsilon is logged after each aggregation. With protected trust
  evidence (`privacy.evidence_clip`: the clients clip and noise their uploaded top-k logits themselves,
  `ClientWork.predict`), the epsilon charges both releases of a round as one composed Gaussian mechanism
  (`algorithms.privacy.composed_noise_multiplier`), and the evidence's own epsilon is logged beside it.
* `require`: too few accepted uploads stops the run cleanly (`quorum.TooFewClients`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from cotune.algorithms.fedcollm import aggregate_slm, fedavg_weights
from cotune.algorithms.personalized import TrustEvidence, aggregate
from cotune.algorithms.privacy import (
    EvidenceProtection,
    add_gaussian_noise,
    clip_uploads,
    composed_noise_multiplier,
    epsilon_spent,
    noise_std,
)
from cotune.algorithms.robust import screen_updates
from cotune.config.names import STRATEGY_SPECS
from cotune.config.schema import ExperimentConfig
from cotune.records import FaultRecord, PrivacyClip, PrivacySpent
from cotune.runtime import quorum
from cotune.runtime.quorum import Log
from cotune.runtime.rundir import client_name
from cotune.seeds import fresh_generator, torch_generator
from cotune.state import AdapterState
from cotune.training.divergence import check_round


def check_trained(
    cfg: ExperimentConfig, round_: int, trained: Mapping[int, tuple[float, AdapterState, AdapterState]]
) -> None:
    """Stop the run when every client that trained in `round_` diverged (`training.divergence.check_round`):
    `trained` maps each client to (its loss, its upload, the adapter it was sent).

    Not in runs that break themselves on purpose or expect untrusted clients: with `simulation.attack`
    the damage is the experiment (honest clients trained from a poisoned average diverge too), and
    `robustness.max_update_norm` or a robust aggregator screen bad uploads instead (`update_rejected`;
    `federation.min_clients` stops the run when too few are left)."""
    r = cfg.robustness
    if cfg.simulation.attack.clients or r.max_update_norm is not None or r.aggregator != "mean":
        return
    scale = cfg.lora.alpha / cfg.lora.r  # one scale at every rank (models.lora.lora_config)
    lower = f"train.lr (this run's is {cfg.train.lr:.3g})"
    if cfg.is_cotuning:  # the clients start from the server's distilled theta
        lower += (
            f" or distill.slm_lr ({cfg.distill.slm_lr or cfg.train.lr:.3g}: the clients start from its theta)"
        )
    check_round(round_, {client_name(k): v for k, v in trained.items()}, scale, lower)


# evidence(accepted, adapters) -> (the members it could be gathered from, evidence about them)
Evidence = Callable[[list[int], list[AdapterState]], tuple[list[int], TrustEvidence]]


def shared_only(state: Mapping[str, torch.Tensor], part: str | None) -> dict[str, torch.Tensor]:
    """The tensors of `state` that other clients receive: those named `part` (FFA-LoRA's B, FedSA-LoRA's
    A), or all of them."""
    return {k: v for k, v in state.items() if part is None or part in k}


@dataclass(frozen=True)
class Mixed:
    """A personalized aggregation: its members, the trust matrix among them and their new adapters."""

    members: list[int]
    trust: torch.Tensor
    adapters: list[AdapterState]


class AggregationPipeline:
    """Screen -> clip -> noise -> aggregate, as the config says; one object per run."""

    def __init__(self, cfg: ExperimentConfig, log: Log) -> None:
        self.cfg, self.log = cfg, log
        self.privacy = cfg.privacy
        self.robustness = cfg.robustness
        self.evidence = EvidenceProtection.of(cfg)  # the clients' protection of their uploaded logits

    # ---- the shared front: screening and clipping ---------------------------------------------------
    def screen(
        self,
        round_: int,
        clients: Sequence[int],
        uploads: Sequence[Mapping[str, torch.Tensor]],
        references: Sequence[Mapping[str, torch.Tensor]],
        n_clients: int,
        part: str | None = None,
    ) -> tuple[list[int], list[AdapterState]]:
        """The clients whose upload is accepted and their uploads (DP-clipped when privacy is on; with
        `part`, only the shared tensors are clipped: the rest never reaches another client)."""
        positions, rejected = screen_updates(uploads, references, self.robustness.max_update_norm)
        for pos, reason in rejected:
            self.log(
                FaultRecord(
                    event="update_rejected",
                    round=round_,
                    phase="aggregate",
                    client=clients[pos],
                    reason=reason,
                )
            )
        accepted = [clients[p] for p in positions]
        kept = [dict(uploads[p]) for p in positions]
        p = self.privacy
        if p.enabled and kept:
            assert p.clip_norm is not None
            refs = [shared_only(references[q], part) for q in positions]
            clipped, norms = clip_uploads([shared_only(u, part) for u in kept], refs, p.clip_norm)
            kept = [{**u, **c} for u, c in zip(kept, clipped, strict=True)]
            self.log(
                PrivacyClip(
                    round=round_,
                    clients=accepted,
                    update_norms=[round(x, 6) for x in norms],
                    clipped=sum(x > p.clip_norm for x in norms),
                    clip_norm=p.clip_norm,
                )
            )
        quorum.require(
            self.cfg, self.log, round_, len(accepted), n_clients, "sent an acceptable update", default=1
        )
        return accepted, kept

    # ---- personalized: trust mixing ------------------------------------------------------------------
    def personalized(
        self,
        round_: int,
        n_clients: int,
        clients: Sequence[int],
        uploads: Sequence[Mapping[str, torch.Tensor]],
        references: Sequence[Mapping[str, torch.Tensor]],
        evidence: Evidence,
    ) -> Mixed:
        """Screen and clip, add DP noise, gather the strategy's evidence on what was uploaded, mix.

        A client left out (rejected, or lost while the evidence was gathered) keeps its own adapter:
        that is the caller's business.
        """
        spec = self.cfg.strategy.spec
        part = spec.shared_part  # FFA-/FedSA-LoRA share one matrix: DP covers it
        accepted, adapters = self.screen(round_, clients, uploads, references, n_clients, part)
        # the row says where the noise goes: one draw on the uniform mean everyone gets, or one per upload
        central = spec.dp_noise == "central"
        if self.privacy.enabled and not central:
            adapters = [
                {**a, **self.noise(round_, shared_only(a, part), 1.0, stream=i)}
                for i, a in zip(accepted, adapters, strict=True)
            ]
        members, ev = evidence(accepted, adapters)
        kept = [adapters[accepted.index(i)] for i in members]
        rob = self.robustness
        trust, mixed = aggregate(self.cfg.strategy, kept, ev, rob.aggregator, rob.trim_fraction)
        if self.privacy.enabled and central:
            noised = self.noise(round_, shared_only(mixed[0], part), 1.0 / len(mixed))
            mixed = [{**m, **{k: v.clone() for k, v in noised.items()}} for m in mixed]
        if self.privacy.enabled or self.evidence is not None:
            where = "central: on the mean of clipped updates" if central else "on each clipped upload"
            self.log_spent(round_, where if self.privacy.enabled else "none on the adapters")
        return Mixed(members, trust, mixed)

    # ---- FedCoLLM: the FedAvg step -------------------------------------------------------------------
    def fedavg(
        self,
        round_: int,
        n_clients: int,
        clients: Sequence[int],
        uploads: Sequence[Mapping[str, torch.Tensor]],
        reference: Mapping[str, torch.Tensor],
        sizes: Sequence[int],
        check: Callable[[Mapping[str, torch.Tensor]], None],
    ) -> AdapterState:
        """Screen the uploads against the broadcast theta, then the (weighted, robust, private) mean.

        `sizes[k]` is client k's n_k; `check` refuses an accepted upload that is not the SLM adapter.
        """
        # FFA-LoRA (federation.ffa_lora): every upload keeps theta's A, so only B is clipped and noised
        part = STRATEGY_SPECS["ffa_lora"].shared_part if self.cfg.federation.ffa_lora else None
        accepted, kept = self.screen(round_, clients, uploads, [reference] * len(clients), n_clients, part)
        for u in kept:
            check(u)
        weights = [sizes[k] for k in accepted]
        weighting, rob = self.cfg.federation.weighting, self.robustness
        averaged = aggregate_slm(kept, weights, weighting, rob.aggregator, rob.trim_fraction)
        if self.privacy.enabled:
            w = fedavg_weights(weights, weighting)
            averaged = {**averaged, **self.noise(round_, shared_only(averaged, part), max(w) / sum(w))}
            self.log_spent(round_, "central: on the (weighted) mean of clipped updates")
        if part is not None:  # every accepted A is theta's: keep it bit for bit (a float mean is an ulp off)
            averaged.update({k: reference[k].clone() for k in averaged if part not in k})
        return averaged

    # ---- differential privacy ------------------------------------------------------------------------
    def generator(self, round_: int, stream: object = 0) -> torch.Generator:
        seed = self.privacy.seed
        if seed is None:
            return fresh_generator()
        return torch_generator("privacy", seed, round_, stream)

    def noise(
        self, round_: int, state: Mapping[str, torch.Tensor], max_weight: float, stream: object = 0
    ) -> AdapterState:
        """state + N(0, (noise_multiplier * clip_norm * max_weight)^2): the Gaussian mechanism on a sum."""
        p = self.privacy
        assert p.clip_norm is not None
        std = noise_std(p.clip_norm, p.noise_multiplier, max_weight)
        return add_gaussian_noise(state, std, self.generator(round_, stream))

    def log_spent(self, round_: int, noise: str) -> None:
        """Epsilon after `round_` aggregations at privacy.delta, q the chance a client takes part in one.

        With protected evidence every round releases two Gaussian mechanisms of the same sampled clients'
        data, the adapter update and the top-k logits, charged as their composition; epsilon stays
        unbounded (None) while the adapters go without DP, and `evidence_epsilon` is the logits' alone."""
        p, ev = self.privacy, self.evidence
        fed = self.cfg.federation
        q = fed.sampled_per_round / fed.clients  # partial participation amplifies privacy
        sigmas = [p.noise_multiplier] if p.enabled else []
        if ev is not None:
            sigmas.append(ev.noise_multiplier)
            noise += f"; evidence: on each client's logits (C_e {ev.clip:g}, σ_e {ev.noise_multiplier:g})"
        eps = epsilon_spent(composed_noise_multiplier(*sigmas), q, round_, p.delta) if p.enabled else math.inf
        ev_eps = epsilon_spent(ev.noise_multiplier, q, round_, p.delta) if ev is not None else None
        self.log(
            PrivacySpent(
                round=round_,
                epsilon=finite(eps),
                delta=p.delta,
                noise_multiplier=p.noise_multiplier,
                clip_norm=p.clip_norm,
                sample_rate=q,
                noise=noise,
                evidence_clip=None if ev is None else ev.clip,
                evidence_noise_multiplier=None if ev is None else ev.noise_multiplier,
                evidence_epsilon=None if ev_eps is None else finite(ev_eps),
            )
        )


def finite(epsilon: float) -> float | None:
    """An epsilon as a record holds it: None for an unbounded one."""
    return None if math.isinf(epsilon) else epsilon
