"""Personalized collaborative fine-tuning (SPEC B): which evidence a trust strategy needs,
and how it turns that evidence into a trust matrix and new client adapters.

Pure: the runtime (embedded or Flower) gathers the evidence, this module decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cotune.algorithms.aggregation import mix_adapters, mix_part
from cotune.algorithms.ranks import flexlora_mix, flora_stack, hetlora_mix, hetlora_weights, rank_of
from cotune.algorithms.robust import Aggregator, robust_average
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
from cotune.config.names import StrategyName
from cotune.config.schema import StrategyConfig
from cotune.state import AdapterState

# What each strategy needs the runtime to measure before an aggregation.
REQUIRED_EVIDENCE: dict[StrategyName, frozenset[str]] = {  # one per name in config.names.STRATEGIES
    "local": frozenset(),
    "fedavg": frozenset(),
    "weight": frozenset({"adapters"}),
    "validation": frozenset({"perplexity"}),
    "prediction": frozenset({"prediction_distance"}),
    "oracle": frozenset({"mixtures"}),
    "ffa_lora": frozenset(),
    "fedsa_lora": frozenset(),
    "hetlora": frozenset({"adapters"}),
    "flexlora": frozenset(),
    "flora": frozenset(),
}

# hetlora / flexlora (algorithms.ranks) aggregate clients of different ranks: HetLoRA zero-pads and takes
# a norm-weighted average of A and B; FlexLoRA averages the products B A and cuts each rank back by SVD.
# flora stacks the factors (B A = the uniform average of the products, exactly, at rank sum r_k); every
# client gets that stack, which the round loop merges into the base (config.names.MERGING_STRATEGIES).

# Strategies that share one LoRA matrix and keep the other: the shared part (averaged), and the part
# the clients do not train. FFA-LoRA (arXiv 2403.12313) freezes every A at the common initialisation
# and averages B, so the average of the products B A is exactly the product of the averages; FedSA-LoRA
# (arXiv 2410.01463) averages A (what the clients have in common) and keeps each B (what is theirs).
SHARED_PART: dict[StrategyName, str] = {"ffa_lora": "lora_B", "fedsa_lora": "lora_A"}
FROZEN_PARTS: dict[StrategyName, tuple[str, ...]] = {"ffa_lora": ("lora_A",)}


@dataclass
class TrustEvidence:
    n_clients: int
    adapters: Sequence[AdapterState] | None = None
    perplexity: torch.Tensor | None = None  # [i, j]: ppl of client j's model on client i's validation data
    prediction_distance: torch.Tensor | None = None  # d_ij, already divided by batches x batch size
    mixtures: torch.Tensor | None = None  # clients x labels


def _need(value, name: str, strategy: str):
    if value is None:
        raise ValueError(f"strategy '{strategy}' needs '{name}' evidence, which the runtime did not provide")
    return value


def trust_matrix(cfg: StrategyConfig, evidence: TrustEvidence) -> torch.Tensor:
    n, name = evidence.n_clients, cfg.name
    if name == "local":
        return identity_trust(n)
    if name in ("fedavg", "flexlora", "flora", *SHARED_PART):
        return uniform_trust(n)
    if name == "hetlora":  # every client takes the same norm-weighted average
        weights = hetlora_weights(_need(evidence.adapters, "adapters", name))
        return weights.to(torch.float32).unsqueeze(0).expand(n, n).clone()
    if name == "oracle":
        return oracle_trust(_need(evidence.mixtures, "mixtures", name))
    if name == "weight":
        scores = similarity_scores(
            weight_similarity(_need(evidence.adapters, "adapters", name)), cfg.temperature
        )
    elif name == "validation":
        scores = validation_scores(_need(evidence.perplexity, "perplexity", name), cfg.temperature)
    elif name == "prediction":
        dist = _need(evidence.prediction_distance, "prediction_distance", name)
        scores = prediction_scores(dist, cfg.temperature)
    else:
        raise ValueError(f"unknown trust strategy {name!r}")
    return trust_from_scores(scores, cfg.selection, k=cfg.topk, threshold=cfg.score_threshold)


def aggregate(
    cfg: StrategyConfig,
    adapters: Sequence[AdapterState],
    evidence: TrustEvidence,
    aggregator: Aggregator = "mean",
    trim_fraction: float = 0.1,
) -> tuple[torch.Tensor, list[AdapterState]]:
    """One aggregation: theta_i <- sum_j W_ij theta_j, with W recomputed from scratch.

    For `fedavg`, `aggregator` median / trimmed_mean replaces the uniform mean by the robust
    coordinate-wise statistic (every client gets it; the logged W stays uniform). Trust-weighted
    strategies ignore it: their defence is the trust matrix itself.
    """
    if evidence.adapters is None:
        evidence.adapters = adapters
    trust = trust_matrix(cfg, evidence)
    if cfg.name == "local":  # W = I: each keeps its own (whatever its rank)
        return trust, [{k: v.clone() for k, v in a.items()} for a in adapters]
    if cfg.name == "fedavg" and aggregator != "mean":
        shared = robust_average(adapters, aggregator, trim_fraction)
        return trust, [{k: v.clone() for k, v in shared.items()} for _ in adapters]
    if cfg.name in SHARED_PART:
        return trust, mix_part(adapters, trust, SHARED_PART[cfg.name])
    if cfg.name == "hetlora":
        return trust, hetlora_mix(adapters, trust)
    if cfg.name == "flora":
        # one global update of rank sum r_k, which every client shares (as FedAvg's clients share one average)
        stacked = flora_stack(adapters, [float(x) for x in trust[0]])
        return trust, [stacked] * len(adapters)
    if cfg.name == "flexlora" or len({rank_of(a) for a in adapters}) > 1:
        # clients of different ranks (lora.ranks): trust mixes the products B A, each cut back by SVD
        return trust, flexlora_mix(adapters, trust)
    return trust, mix_adapters(adapters, trust)
