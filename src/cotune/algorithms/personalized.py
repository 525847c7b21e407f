"""Personalized collaborative fine-tuning (SPEC B): how a strategy turns its evidence into a trust
matrix and new client adapters.

Each strategy is one row of `config.names.STRATEGY_SPECS` (pure data: its evidence, shared and frozen
parts, where DP noise goes, whether it merges into the base, mixed ranks); the row names a trust rule
and a mix rule, which are the functions of `TRUST_RULES` and `MIX_RULES` here, each shared by every row
that names it. Pure: the runtime (embedded or Flower) gathers the evidence, this module decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from cotune.algorithms.aggregation import mix_adapters, mix_part
from cotune.algorithms.ranks import (
    fedex_stack,
    flexlora_mix,
    flora_stack,
    hetlora_mix,
    hetlora_weights,
    rank_of,
)
from cotune.algorithms.robust import robust_average
from cotune.algorithms.trust import (
    identity_trust,
    oracle_trust,
    prediction_scores,
    similarity_scores,
    trust_from_scores,
    uniform_trust,
    validation_scores,
    weight_similarity,
)
from cotune.config.names import Aggregator, MixRule, StrategySpec, TrustRule
from cotune.config.schema import StrategyConfig
from cotune.state import AdapterState

T = TypeVar("T")


@dataclass
class TrustEvidence:
    """What the runtime measured for a strategy (`StrategySpec.evidence` names the fields it needs)."""

    n_clients: int
    adapters: Sequence[AdapterState] | None = None
    perplexity: torch.Tensor | None = None  # [i, j]: ppl of client j's model on client i's validation data
    prediction_distance: torch.Tensor | None = None  # d_ij, already divided by batches x batch size
    mixtures: torch.Tensor | None = None  # clients x labels


def need(value: T | None, name: str, strategy: str) -> T:
    """`value`, the evidence `name` a strategy's trust rule reads; refused when the runtime left it out."""
    if value is None:
        raise ValueError(f"strategy '{strategy}' needs '{name}' evidence, which the runtime did not provide")
    return value


# ---- trust rules: (strategy settings, evidence) -> W ------------------------------------------------------
TrustFn = Callable[[StrategyConfig, TrustEvidence], torch.Tensor]


def selected(cfg: StrategyConfig, scores: torch.Tensor) -> torch.Tensor:
    """W from pre-softmax scores, with the strategy's selection (all, top-k or a threshold)."""
    return trust_from_scores(scores, cfg.selection, k=cfg.topk, threshold=cfg.score_threshold)


def trust_identity(cfg: StrategyConfig, evidence: TrustEvidence) -> torch.Tensor:
    """W = I: every client keeps its own."""
    return identity_trust(evidence.n_clients)


def trust_uniform(cfg: StrategyConfig, evidence: TrustEvidence) -> torch.Tensor:
    """W = 1/N everywhere: one shared aggregate."""
    return uniform_trust(evidence.n_clients)


def trust_update_norms(cfg: StrategyConfig, evidence: TrustEvidence) -> torch.Tensor:
    """HetLoRA: every client takes the same norm-weighted average (each row: ||B_j A_j|| / sum)."""
    weights = hetlora_weights(need(evidence.adapters, "adapters", cfg.name))
    n = evidence.n_clients
    return weights.to(torch.float32).unsqueeze(0).expand(n, n).clone()


def trust_weight_similarity(cfg: StrategyConfig, evidence: TrustEvidence) -> torch.Tensor:
    """Weight trust: softmax of the clients' mean cosine similarity over their LoRA matrices."""
    similarity = weight_similarity(need(evidence.adapters, "adapters", cfg.name))
    return selected(cfg, similarity_scores(similarity, cfg.temperature))


def trust_validation(cfg: StrategyConfig, evidence: TrustEvidence) -> torch.Tensor:
    """Validation trust: softmax of minus each peer's perplexity on the client's validation data."""
    perplexity = need(evidence.perplexity, "perplexity", cfg.name)
    return selected(cfg, validation_scores(perplexity, cfg.temperature))


def trust_prediction(cfg: StrategyConfig, evidence: TrustEvidence) -> torch.Tensor:
    """Prediction trust: softmax of minus the distance of top-k logits on the public set."""
    distance = need(evidence.prediction_distance, "prediction_distance", cfg.name)
    return selected(cfg, prediction_scores(distance, cfg.temperature))


def trust_oracle(cfg: StrategyConfig, evidence: TrustEvidence) -> torch.Tensor:
    """Oracle trust: from the clients' known label mixtures (experiments only)."""
    return oracle_trust(need(evidence.mixtures, "mixtures", cfg.name))


TRUST_RULES: dict[TrustRule, TrustFn] = {  # one per name in config.names.TrustRule
    "identity": trust_identity,
    "uniform": trust_uniform,
    "update_norms": trust_update_norms,
    "weight_similarity": trust_weight_similarity,
    "validation": trust_validation,
    "prediction": trust_prediction,
    "oracle": trust_oracle,
}


# ---- mix rules: (adapters, W, how) -> every client's new adapter ------------------------------------------
@dataclass(frozen=True)
class Mixing:
    """What a mix rule reads besides the adapters and W: the strategy's row, and the FedAvg aggregator."""

    spec: StrategySpec
    aggregator: Aggregator = "mean"
    trim_fraction: float = 0.1


MixFn = Callable[[Sequence[AdapterState], torch.Tensor, Mixing], list[AdapterState]]


def mix_keep(adapters: Sequence[AdapterState], trust: torch.Tensor, how: Mixing) -> list[AdapterState]:
    """W = I: each keeps (a copy of) its own, whatever its rank."""
    return [{k: v.clone() for k, v in a.items()} for a in adapters]


def mix_weighted(adapters: Sequence[AdapterState], trust: torch.Tensor, how: Mixing) -> list[AdapterState]:
    """theta_i <- sum_j W_ij theta_j on A and B apart; clients of different ranks (lora.ranks) mix the
    products B A instead, each cut back to its rank by SVD (FlexLoRA's rule with W)."""
    if len({rank_of(a) for a in adapters}) > 1:
        return flexlora_mix(adapters, trust)
    return mix_adapters(adapters, trust)


def mix_mean(adapters: Sequence[AdapterState], trust: torch.Tensor, how: Mixing) -> list[AdapterState]:
    """FedAvg: the uniform mean, or the robust statistic of `robustness.aggregator` for every client
    (the logged W stays uniform). Trust-weighted rules ignore the aggregator: their defence is W."""
    if how.aggregator == "mean":
        return mix_weighted(adapters, trust, how)
    shared = robust_average(adapters, how.aggregator, how.trim_fraction)
    return [{k: v.clone() for k, v in shared.items()} for _ in adapters]


def mix_shared_part(adapters: Sequence[AdapterState], trust: torch.Tensor, how: Mixing) -> list[AdapterState]:
    """FFA-LoRA / FedSA-LoRA: only the row's shared LoRA matrix is mixed; each keeps the other."""
    assert how.spec.shared_part is not None, "a shared_part row names its part (tests/test_vocabulary.py)"
    return mix_part(adapters, trust, how.spec.shared_part)


def mix_hetlora(adapters: Sequence[AdapterState], trust: torch.Tensor, how: Mixing) -> list[AdapterState]:
    """HetLoRA: zero-padded to the largest rank, mixed, each cut back to its own rank."""
    return hetlora_mix(adapters, trust)


def mix_flexlora(adapters: Sequence[AdapterState], trust: torch.Tensor, how: Mixing) -> list[AdapterState]:
    """FlexLoRA: the products B A mixed, each client's rank taken back by SVD."""
    return flexlora_mix(adapters, trust)


def mix_flora(adapters: Sequence[AdapterState], trust: torch.Tensor, how: Mixing) -> list[AdapterState]:
    """FLoRA: one global update of rank sum r_k (the factors stacked), which every client shares (as
    FedAvg's clients share one average); the round loop merges it into the base (`merge: update`)."""
    stacked = flora_stack(adapters, [float(x) for x in trust[0]])
    return [stacked] * len(adapters)


def mix_fedex(adapters: Sequence[AdapterState], trust: torch.Tensor, how: Mixing) -> list[AdapterState]:
    """FedEx-LoRA: FedAvg's adapter with the residual of the products stacked before it, which every
    client shares; the round loop merges the residual into the base (`merge: residual`)."""
    return [fedex_stack(adapters, trust)] * len(adapters)


MIX_RULES: dict[MixRule, MixFn] = {  # one per name in config.names.MixRule
    "keep": mix_keep,
    "mean": mix_mean,
    "weighted": mix_weighted,
    "shared_part": mix_shared_part,
    "hetlora": mix_hetlora,
    "flexlora": mix_flexlora,
    "flora": mix_flora,
    "fedex": mix_fedex,
}


# ---- one aggregation -----------------------------------------------------------------------------------
def trust_matrix(cfg: StrategyConfig, evidence: TrustEvidence) -> torch.Tensor:
    """W for the strategy `cfg.name`, from scratch: its row's trust rule."""
    return TRUST_RULES[cfg.spec.trust](cfg, evidence)


def aggregate(
    cfg: StrategyConfig,
    adapters: Sequence[AdapterState],
    evidence: TrustEvidence,
    aggregator: Aggregator = "mean",
    trim_fraction: float = 0.1,
) -> tuple[torch.Tensor, list[AdapterState]]:
    """One aggregation: theta_i <- sum_j W_ij theta_j, with W recomputed from scratch; the row's mix rule
    says how W is applied (`aggregator` median / trimmed_mean: FedAvg's robust mean, `mix_mean`)."""
    if evidence.adapters is None:
        evidence.adapters = adapters
    trust = trust_matrix(cfg, evidence)
    return trust, MIX_RULES[cfg.spec.mix](adapters, trust, Mixing(cfg.spec, aggregator, trim_fraction))
