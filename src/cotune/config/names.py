"""Every family, personalized strategy and FedCoLLM-family algorithm name, spelled once.

The config schema, the round loops, the algorithm tables and the reports all take their names from
here, so a new strategy or algorithm is added in one place and a typo is a type error.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

Family = Literal["personalized", "fedcollm"]
PERSONALIZED: Final = "personalized"  # the personalized family's one `algorithm` value (SPEC B)
FEDCOLLM: Final = "fedcollm"

# SPEC B: how every client's adapter takes from the others' (the trust matrix, or a baseline).
# ffa_lora / fedsa_lora: the federated LoRA baselines that share one of the two LoRA matrices;
# hetlora / flexlora / flora: the ones that aggregate adapters of different ranks (lora.ranks); flora
# (one global model) merges each round's stacked update into every client's base weights.
StrategyName = Literal[
    "local",
    "fedavg",
    "weight",
    "validation",
    "prediction",
    "oracle",
    "ffa_lora",
    "fedsa_lora",
    "hetlora",
    "flexlora",
    "flora",
]
# The strategies that accept clients of different LoRA ranks (the others mix tensors element-wise);
# validation / prediction / oracle trust then mix the products B A by W and cut each back by SVD.
MIXED_RANK_STRATEGIES: tuple[StrategyName, ...] = (
    "local",
    "hetlora",
    "flexlora",
    "flora",
    "validation",
    "prediction",
    "oracle",
)
# SPEC A: FedCoLLM and the baselines it is judged against.
FedCoLLMAlgorithm = Literal["fedcollm", "fedavg", "standalone", "centralized", "zero_shot"]
Algorithm = Literal["personalized", FedCoLLMAlgorithm]

# Simulated attackers (`simulation.attack.kind`): what replaces an upload, training data or claim.
AttackKind = Literal["noise", "sign_flip", "scale", "nan", "garbage_data", "inflated_claim"]
UPLOAD_ATTACKS: tuple[AttackKind, ...] = ("noise", "sign_flip", "scale", "nan")

STRATEGIES: tuple[StrategyName, ...] = get_args(StrategyName)
# Strategies whose aggregate is merged into the clients' base weights (each client then starts a fresh
# LoRA): the port's `set_base`, and checkpoints holding the merged history stacked before each adapter.
MERGING_STRATEGIES: tuple[StrategyName, ...] = ("flora",)
FEDCOLLM_ALGORITHMS: tuple[FedCoLLMAlgorithm, ...] = get_args(FedCoLLMAlgorithm)
LLM_ALGORITHMS: tuple[FedCoLLMAlgorithm, ...] = ("fedcollm", "centralized")  # they train the server LLM

# The config sections each family reads; a run's resolved config.yaml holds these and no others.
SHARED_SECTIONS = (
    "algorithm",
    "device",
    "model",
    "lora",
    "train",
    "federation",
    "run",
    "robustness",
    "privacy",
    "simulation",
)
FAMILY_SECTIONS: dict[Family, tuple[str, ...]] = {
    "personalized": (*SHARED_SECTIONS, "data", "strategy"),
    "fedcollm": (*SHARED_SECTIONS, "llm", "task", "distill"),
}
# Federation settings only one family reads: setting one for the other family is refused.
FAMILY_FEDERATION_FIELDS: dict[Family, tuple[str, ...]] = {
    "personalized": ("warmup_steps",),
    "fedcollm": ("local_epochs", "weighting", "max_examples", "ffa_lora"),
}


def family_of(algorithm: str) -> Family:
    """The family an algorithm name belongs to."""
    return "personalized" if algorithm == PERSONALIZED else "fedcollm"
