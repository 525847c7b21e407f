"""The metric records a run writes to its metrics.jsonl: one typed class per kind, defined once.

The round loops, the aggregation pipeline and the run-directory code build these; `reporting`
reads them back with `parse_record`. A record's `type` field names its class in the JSON line, so
the file stays plain JSONL that any tool can read. Reading is lenient: a line whose type is unknown
or whose fields do not validate is skipped (a run may be killed mid-write, and later versions may
add kinds of their own), never fatal.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from cotune.config.names import Role


def _not_bool(value: Any) -> Any:
    """JSON true/false are not numbers here (pydantic would read them as 1/0)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


Split = Literal["val", "test"]  # which held-out part of a client's data a score is on
Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]


def now() -> float:
    return time.time()


# Record fields that measure time (wall clock, throughput, build time): two runs that compute the same
# thing differ only in these, so comparisons of runs (resume, transports) leave them out.
CLOCK_FIELDS = frozenset({"time", "wall_s", "train_s", "tokens_per_s", "val_s", "map_s"})


class Record(BaseModel):
    """One line of metrics.jsonl. Unknown fields are ignored on reading (newer writers may add some);
    the fields a report does not need default to None, so runs written before a field existed still read."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    type: str

    def line(self) -> dict[str, Any]:
        """The JSON object written for this record (every field, None included)."""
        return self.model_dump()


class RunEvent(Record):
    """The run's life: start, resume, end, stopped (too few clients / a stop request), failed."""

    type: Literal["run"] = "run"
    event: Literal["start", "resume", "end", "stopped", "failed"]
    algorithm: str | None = None
    strategy: str | None = None
    clients: Int | None = None
    backend: str | None = None
    client_names: list[str] | None = None  # start: each client named by its data (e.g. its main label)
    # start: duplicated {"documents": n, "examples": m} dropped before the split (None: not known here)
    duplicates: dict[str, Int] | None = None
    round: Int | None = None  # stopped: the round in progress
    after_round: Int | None = None  # resume: the last completed round
    last_checkpoint: Int | None = None
    reason: str | None = None
    error: str | None = None
    time: float = Field(default_factory=now)


class RoundRecord(Record):
    """One completed round: its wall time and, for the personalized family, the mean val perplexity."""

    type: Literal["round"] = "round"
    round: Int
    step: Int
    wall_s: Float
    train_s: Float
    mean_val_ppl: Float | None = None
    participants: list[Int] | None = None


class TrainRecord(Record):
    """One client's (or the server LLM's, client None) local training in a round."""

    type: Literal["train"] = "train"
    round: Int
    client: Int | None
    loss: Float
    lr: Float
    model: Role | None = None  # FedCoLLM family
    step: Int | None = None  # personalized family
    last_loss: Float | None = None
    tokens_per_s: Float | None = None


class EvalRecord(Record):
    """A personalized client's language-model metrics on one of its splits."""

    type: Literal["eval"] = "eval"
    round: Int
    client: Int
    ppl: Float
    split: Split = "val"
    step: Int | None = None
    loss: Float | None = None
    acc: Float | None = None
    tokens: Int | None = None


class TrustRecord(Record):
    """The trust matrix of one personalized aggregation (rows: receivers, columns: senders)."""

    type: Literal["trust"] = "trust"
    round: Int
    matrix: list[list[Float]] = Field(min_length=1)
    step: Int | None = None
    strategy: str | None = None
    aggregator: str | None = None
    participants: list[Int] | None = None

    @model_validator(mode="after")
    def _rectangular(self) -> TrustRecord:
        if len({len(row) for row in self.matrix}) != 1 or not self.matrix[0]:
            raise ValueError("a trust matrix has rows of one non-zero length")
        return self


class McRecord(Record):
    """Multiple-choice accuracy of one model (client None: the global / server adapter)."""

    type: Literal["mc"] = "mc"
    round: Int
    model: Role
    client: Int | None
    acc: Float
    acc_norm: Float = float("nan")
    n: Int | None = None


class GenRecord(Record):
    """Generated text judged against the reference responses of one split.

    FedCoLLM family: one model (`model` slm / llm; `client` None for the global adapter, an index for a
    standalone client's); personalized family: one client's own adapter (`model` None). `ppl` is the
    perplexity of the reference responses (teacher-forced, response tokens only, the stop token included).
    """

    type: Literal["gen"] = "gen"
    round: Int
    n: Int
    exact_match: Float
    f1: Float
    rouge_l: Float
    ppl: Float
    split: Split = "test"
    model: Role | None = None
    client: Int | None = None
    step: Int | None = None

    @classmethod
    def of(cls, scores: Any, **where: Any) -> GenRecord:
        """The record of an evaluation's scores (anything with n, exact_match, f1, rouge_l and ppl:
        `GenEval` on the server, a client's `GenScores`), placed by `where` (round, model, client...)."""
        fields = ("n", "exact_match", "f1", "rouge_l", "ppl")
        return cls(**{f: getattr(scores, f) for f in fields}, **where)


SAMPLE_PROMPT_CHARS = 300  # a gen_sample's prompt: its start (an article's opening, a function's signature)
SAMPLE_TEXT_CHARS = 200  # a gen_sample's reference or generation


class GenSampleRecord(Record):
    """One example of shipped public data shown with what a model generated for it, beside the `gen`
    record of the same round, model and client (a few per model or client, at the run's final round).
    Written only when the run's data is the shipped public data (`config.schema.shipped_generation`):
    never for a user's own examples. Texts are cut to a bounded length when written; reports escape
    them when shown (`SAMPLE_PROMPT_CHARS`, `SAMPLE_TEXT_CHARS`)."""

    type: Literal["gen_sample"] = "gen_sample"
    round: Int
    example: Int  # its index in the evaluated split
    prompt: str
    reference: str
    generated: str
    split: Split = "test"
    model: Role | None = None
    client: Int | None = None
    step: Int | None = None


class CommRecord(Record):
    """One client's traffic in one round, against the full (small) model's size.

    FedCoLLM family: the SLM adapter each way. Personalized family: every adapter the server sent the
    client (to train, evaluate, and as validation-trust evidence) and everything it sent back (its
    trained adapter, prediction-trust logits); with lora.ranks the bytes differ by client."""

    type: Literal["comm"] = "comm"
    round: Int
    client: Int
    bytes_up: Float
    bytes_down: Float
    full_slm_bytes: Float
    ratio: Float = float("nan")  # bytes_up / full_slm_bytes when a writer left it out

    @model_validator(mode="after")
    def _ratio(self) -> CommRecord:
        if math.isnan(self.ratio) and self.full_slm_bytes > 0:
            object.__setattr__(self, "ratio", self.bytes_up / self.full_slm_bytes)
        return self


class DistillRecord(Record):
    """One round of server-side mutual distillation: mean losses per batch, teacher payload size."""

    type: Literal["distill"] = "distill"
    round: Int
    step: Int
    slm_ce: Float
    slm_kd: Float
    llm_ce: Float
    llm_kd: Float
    teacher_bytes: Int
    topk: Int | None
    wall_s: Float
    val_s: Float | None = None  # of wall_s, the seconds spent scoring the server's validation split
    slm_kept: Int | None = None  # the distillation step whose theta the round kept (None: the last)
    llm_kept: Int | None = None  # the same for omega


class AlignRecord(Record):
    """One round's distillation across tokenizers (an LLM of another tokenizer than the SLM's), for one
    student `model` (its teacher: the other): of the student's `positions` supervised tokens on D_a,
    `exact_share` had a span agreeing with one teacher token, `merged` began a group of several (also
    paired), `unaligned` were in no group (the texts differ); at the `paired` positions the teacher's
    top-k mass carried into the student's vocabulary on average (`carried_share`), the mass on tokens the
    student lacks (`unmatched_share`, dropped), and the positions with nothing carried (`empty`);
    `vocab_matched`: the share of the teacher's vocabulary with an exact match in the student's; the
    map's digest and the seconds it took to build (or read)."""

    type: Literal["align"] = "align"
    round: Int
    model: Role
    positions: Int
    paired: Int
    exact_share: Float
    merged: Int
    unaligned: Int
    carried_share: Float
    unmatched_share: Float
    empty: Int
    vocab_matched: Float
    map_digest: str
    map_s: Float


class DistillValRecord(Record):
    """One model scored on the server's validation split (carved from D_a) during a round's distillation.

    Step 0 is the round's start (the SLM: the clients' FedAvg average; the LLM: omega as the round found
    it), step s is after the model's s-th distillation step of the round. `nll` is the choice-level loss:
    -log of the right choice's probability, softmax over the choices' log-likelihoods, averaged. A
    generation task is not decoded here: `acc` is None and `nll` the teacher-forced loss per response
    token (stop tokens included) over the split.
    """

    type: Literal["distill_val"] = "distill_val"
    round: Int
    model: Role
    step: Int
    acc: Float | None
    nll: Float
    n: Int

    @property
    def merit(self) -> tuple[float, float]:
        """What ranks validation scores (`val_merit`): the higher, the better."""
        return val_merit(self.acc, self.nll)


def val_merit(acc: float | None, nll: float) -> tuple[float, float]:
    """The order of validation scores, higher better: higher accuracy, then lower loss (the finer signal
    on a small split); without accuracies (a generation task), lower loss."""
    return (0.0 if acc is None else acc, -nll)


class FaultRecord(Record):
    """A client dropped from a round (no answer), an upload rejected by screening, or an example
    count (FedAvg weight) the server did not take as claimed."""

    type: Literal["fault"] = "fault"
    event: Literal["client_dropped", "update_rejected", "claim_rejected"]
    round: Int
    phase: str
    client: Int
    reason: str
    time: float = Field(default_factory=now)


class PrivacyClip(Record):
    """Client-level DP: the update norms of one aggregation and how many were clipped."""

    type: Literal["privacy"] = "privacy"
    event: Literal["clip"] = "clip"
    round: Int
    clients: list[Int]
    update_norms: list[Float]
    clipped: Int
    clip_norm: Float


class PrivacySpent(Record):
    """Client-level DP: the privacy spent after an aggregation (epsilon None: unbounded)."""

    type: Literal["privacy"] = "privacy"
    event: Literal["spent"] = "spent"
    round: Int
    epsilon: Float | None
    delta: Float
    noise_multiplier: Float
    clip_norm: Float | None
    sample_rate: Float
    noise: str
    # protected trust evidence (privacy.evidence_clip): its bound, noise multiplier and its own epsilon
    # (epsilon above composes it with the adapters' releases)
    evidence_clip: Float | None = None
    evidence_noise_multiplier: Float | None = None
    evidence_epsilon: Float | None = None


KINDS: dict[tuple[str, str | None], type[Record]] = {
    ("run", None): RunEvent,
    ("round", None): RoundRecord,
    ("train", None): TrainRecord,
    ("eval", None): EvalRecord,
    ("trust", None): TrustRecord,
    ("mc", None): McRecord,
    ("gen", None): GenRecord,
    ("gen_sample", None): GenSampleRecord,
    ("comm", None): CommRecord,
    ("distill", None): DistillRecord,
    ("distill_val", None): DistillValRecord,
    ("align", None): AlignRecord,
    ("fault", None): FaultRecord,
    ("privacy", "clip"): PrivacyClip,
    ("privacy", "spent"): PrivacySpent,
}


def parse_record(obj: Any) -> Record | None:
    """The typed record of one JSON object, or None when its kind is unknown or its fields are invalid."""
    if not isinstance(obj, dict):
        return None
    kind = obj.get("type")
    cls = KINDS.get((kind, None)) or KINDS.get((kind, obj.get("event")))  # type: ignore[arg-type]
    if cls is None:
        return None
    try:
        return cls.model_validate(obj)
    except ValidationError:
        return None
