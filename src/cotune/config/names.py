"""Every family, personalized strategy and FedCoLLM-family algorithm name, spelled once, and the one
table of personalized strategies (`STRATEGY_SPECS`: a row of pure data each).

The config schema, the round loops, the algorithm tables and the reports all take their names from
here, so a new strategy or algorithm is added in one place and a typo is a type error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, cast, get_args

Family = Literal["personalized", "fedcollm"]
PERSONALIZED: Final = "personalized"  # the personalized family's one `algorithm` value (SPEC B)
FEDCOLLM: Final = "fedcollm"

# SPEC B: how every client's adapter takes from the others' (the trust matrix, or a baseline): one row
# each in STRATEGY_SPECS below.
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
    "fedex_lora",
]
# What a strategy needs the runtime to measure before an aggregation (a field of
# algorithms.personalized.TrustEvidence each; "perplexity" and "prediction_distance" take an exchange
# with every client).
Evidence = Literal["adapters", "perplexity", "prediction_distance", "mixtures"]
# How a strategy computes its trust matrix W, and how it applies W to the adapters: each rule is one
# function in algorithms.personalized (TRUST_RULES, MIX_RULES), shared by every row that names it.
TrustRule = Literal[
    "identity", "uniform", "update_norms", "weight_similarity", "validation", "prediction", "oracle"
]
MixRule = Literal["keep", "mean", "weighted", "shared_part", "hetlora", "flexlora", "flora", "fedex"]
LoraPart = Literal["lora_A", "lora_B"]  # the two LoRA matrices, as peft names them in a key


@dataclass(frozen=True)
class StrategySpec:
    """Everything about one personalized strategy that any layer asks, in one row.

    Pure data, so that the config (which refuses a strategy with mixed ranks, or prediction trust with no
    public set, before any work starts) can read it as well as the aggregation and the round loop; the
    two behaviours are named by rule and resolved to functions in `algorithms.personalized`.
    """

    trust: TrustRule  # how W is computed
    mix: MixRule  # how W is applied to the adapters
    evidence: frozenset[Evidence] = frozenset()  # what the runtime must measure first
    shared_part: LoraPart | None = None  # the one LoRA matrix that is mixed (and DP-clipped); None: all
    frozen_parts: tuple[LoraPart, ...] = ()  # the LoRA matrices the clients do not train
    # where DP noise goes: one draw on the uniform mean everyone gets, or one on each upload (clients
    # that take different weighted sums, or an aggregate computed from the uploads themselves)
    dp_noise: Literal["central", "per_upload"] = "per_upload"
    # whether the aggregate is merged into every client's base weights (the port's `set_base`; checkpoints
    # hold the merged history stacked before each adapter): "update", all of it, and every client restarts
    # from a fresh LoRA; "residual", all but its last lora.r components, which every client keeps
    merge: Literal["none", "update", "residual"] = "none"
    mixed_ranks: bool = False  # accepts clients of different LoRA ranks (lora.ranks)
    tau: float = 1.0  # the default softmax temperature of its trust scores (strategy.tau)
    threshold: float = 0.0  # the default score threshold (strategy.threshold, selection: threshold)

    @property
    def exchanges(self) -> bool:
        """Whether anything of a client travels: a strategy that keeps every adapter as trained and
        measures nothing about the others (local) needs no message, so its traffic is zero."""
        return self.mix != "keep" or bool(self.evidence)


# ffa_lora / fedsa_lora share one of the two LoRA matrices: FFA-LoRA (arXiv 2403.12313) freezes every A at
# the common initialisation and averages B, so the average of the products B A is exactly the product of
# the averages; FedSA-LoRA (arXiv 2410.01463) averages A (what the clients have in common) and keeps each
# B. hetlora / flexlora / flora aggregate adapters of different ranks (algorithms.ranks); validation /
# prediction / oracle trust then mix the products B A by W and cut each back by SVD.
# One row per name in StrategyName (tests/test_vocabulary.py checks every row is there and complete).
STRATEGY_SPECS: dict[StrategyName, StrategySpec] = {
    "local": StrategySpec(trust="identity", mix="keep", mixed_ranks=True),
    "fedavg": StrategySpec(trust="uniform", mix="mean", dp_noise="central"),
    "weight": StrategySpec(
        trust="weight_similarity", mix="weighted", evidence=frozenset({"adapters"}), threshold=0.5
    ),
    "validation": StrategySpec(
        trust="validation",
        mix="weighted",
        evidence=frozenset({"perplexity"}),
        mixed_ranks=True,
        threshold=-30.0,
    ),
    "prediction": StrategySpec(
        trust="prediction",
        mix="weighted",
        evidence=frozenset({"prediction_distance"}),
        mixed_ranks=True,
        tau=0.1,
        threshold=-50.0,
    ),
    "oracle": StrategySpec(
        trust="oracle", mix="weighted", evidence=frozenset({"mixtures"}), mixed_ranks=True
    ),
    "ffa_lora": StrategySpec(
        trust="uniform", mix="shared_part", shared_part="lora_B", frozen_parts=("lora_A",), dp_noise="central"
    ),
    "fedsa_lora": StrategySpec(trust="uniform", mix="shared_part", shared_part="lora_A", dp_noise="central"),
    "hetlora": StrategySpec(
        trust="update_norms", mix="hetlora", evidence=frozenset({"adapters"}), mixed_ranks=True
    ),
    "flexlora": StrategySpec(trust="uniform", mix="flexlora", mixed_ranks=True),
    "flora": StrategySpec(trust="uniform", mix="flora", merge="update", mixed_ranks=True),
    # FedEx-LoRA (arXiv 2410.09432): FedAvg's A and B, the residual of their product merged into the base
    "fedex_lora": StrategySpec(trust="uniform", mix="fedex", merge="residual"),
}
# The strategies that accept clients of different LoRA ranks (the others mix tensors element-wise).
MIXED_RANK_STRATEGIES: tuple[StrategyName, ...] = tuple(n for n, s in STRATEGY_SPECS.items() if s.mixed_ranks)


def strategy_spec(name: str) -> StrategySpec:
    """The row of a strategy name (KeyError for a name that is not one)."""
    return STRATEGY_SPECS[cast(StrategyName, name)]


# SPEC A: FedCoLLM and the baselines it is judged against. fedavg_ft is the control that isolates the
# LLM's contribution: FedAvg, then the server's SLM steps on D_a exactly as FedCoLLM runs them but with
# cross-entropy only (lambda = 0, no LLM loaded), under the same selection rule (distill.keep).
FedCoLLMAlgorithm = Literal["fedcollm", "fedavg", "fedavg_ft", "standalone", "centralized", "zero_shot"]
Algorithm = Literal["personalized", FedCoLLMAlgorithm]

# The FedAvg step's aggregator (robustness.aggregator): one function each in algorithms.robust.AGGREGATORS.
Aggregator = Literal["mean", "median", "trimmed_mean"]
# The FedAvg step's client weights (federation.weighting): n_k (local examples) or uniform.
Weighting = Literal["examples", "uniform"]
# How an adapter travels (federation.compress.codec): as it is (float32), half precision, 8 bits per weight
# with a float32 scale per block, or 4-bit NF4 levels (QLoRA) with a float32 absmax per block
Codec = Literal["none", "fp16", "bf16", "int8", "nf4"]
BLOCK_CODECS: Final[frozenset[str]] = frozenset({"int8", "nf4"})  # the codecs that read a block size
# The FedCoLLM-family algorithms whose clients exchange adapters with the server (algorithms.fedcollm.PLANS'
# rows with `aggregate`): the others have nothing to compress
EXCHANGING_ALGORITHMS: Final[tuple[FedCoLLMAlgorithm, ...]] = ("fedcollm", "fedavg", "fedavg_ft")
# Which trust scores a personalized client's softmax keeps (strategy.selection; algorithms.trust).
Selection = Literal["all", "topk", "threshold"]
# The FedCoLLM family's two models: the small one every client trains, the server's large one. Within a
# distillation batch (distill.order: batch) the SLM steps first.
Role = Literal["slm", "llm"]
ROLES: tuple[Role, Role] = ("slm", "llm")
# Experiment trackers (run.loggers): one opener each in reporting.trackers.OPENERS.
TrackerName = Literal["tensorboard", "mlflow", "wandb"]
# Injected faults (simulation.faults[].kind): the client's round work raises, or takes longer.
FaultKind = Literal["error", "delay"]

# Simulated attackers (`simulation.attack.kind`): what replaces an upload, training data or claim.
AttackKind = Literal["noise", "sign_flip", "scale", "nan", "garbage_data", "inflated_claim"]
UPLOAD_ATTACKS: tuple[AttackKind, ...] = ("noise", "sign_flip", "scale", "nan")

STRATEGIES: tuple[StrategyName, ...] = get_args(StrategyName)
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
