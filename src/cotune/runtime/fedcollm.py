"""The round loop of FedCoLLM and its baselines (SPEC A), written once for every transport.

The server holds the SLM with its copy of the clients' adapter theta (slot `SERVER`) and, when the
algorithm needs it, the LLM with its server-only LoRA omega (`LLM_ADAPTER`); the clients hold the
SLM and their private data. Every algorithm of the family walks the same round; `PLANS` switches
its steps on or off: 1. broadcast theta; 2. local training on the clients (the `Clients` port);
3. FedAvg of the uploads (the aggregation pipeline); 4. mutual distillation on D_a; or the
centralized LLM baseline. Evaluation scores the held-out test split by the task's kind: multiple-choice
accuracy, or (task.kind generation) greedy generations judged by exact match, F1 and ROUGE-L with the
reference responses' perplexity. The server's validation split scores a generation task by the
teacher-forced response loss alone (no decoding inside the distillation loop).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from cotune.algorithms.compression import Compression, roundtrip_state
from cotune.algorithms.fedcollm import check_payload, fedavg_weights, plan_of
from cotune.algorithms.vocab_alignment import Coverage
from cotune.config.names import ROLES, Role
from cotune.config.schema import ExperimentConfig
from cotune.data.generation import gen_requests
from cotune.data.task_data import TaskData
from cotune.evaluation.generation import (
    GenEval,
    GenRequest,
    OnDone,
    context_length,
    evaluate_generation,
    fit_context,
    gen_samples,
    generation_count,
    length_order,
    pad_token_id,
    response_nll,
    stop_token_ids,
)
from cotune.evaluation.multiple_choice import (
    MCExample,
    MCResult,
    OnScored,
    choice_count,
    evaluate_multiple_choice,
)
from cotune.models.adapter_check import AdapterSpec
from cotune.models.lora import AdapterPool
from cotune.models.vocab_map import TokenizerBridge
from cotune.records import (
    AlignRecord,
    DistillRecord,
    DistillValRecord,
    GenRecord,
    GenSampleRecord,
    McRecord,
    Record,
    RoundRecord,
    RunEvent,
    TrainRecord,
    val_merit,
)
from cotune.reporting.progress import Activity, Advance
from cotune.runtime.claims import checked_sizes
from cotune.runtime.membership import Membership
from cotune.runtime.pipeline import AggregationPipeline, check_trained
from cotune.runtime.port import Clients
from cotune.runtime.rounds import RoundTimes, run_rounds
from cotune.runtime.rundir import RunFiles, client_name, load_adapter
from cotune.runtime.traffic import Traffic
from cotune.state import AdapterState, copied, state_digest
from cotune.training.distill import TeacherSignal, crossed_signal, student_step, teacher_signal
from cotune.training.learner import Learner
from cotune.training.loop import Batch

SERVER = "server"  # the server's copy of the SLM adapter (theta), inside the SLM pool
LLM_ADAPTER = "server-llm"  # the LLM's server-only LoRA (omega); never leaves the server


def adapter_digest(pool: AdapterPool, name: str) -> str:
    """A fingerprint of one adapter's weights (`state_digest`)."""
    return state_digest(pool.state(name))


def choice_nll(logliks: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Mean over examples of -log p(right choice), p the softmax over the choices' log-likelihoods."""
    total = 0.0
    for scores, answer in zip(logliks, answers, strict=True):
        t = torch.tensor(scores, dtype=torch.float64)
        total += float(torch.logsumexp(t, 0) - t[answer])
    return total / max(1, len(answers))


def cached(
    cache: EvalCache,
    key: Any,
    pool: AdapterPool,
    name: str,
    compute: Callable[[], Any],
    count: int,
    on_done: OnDone | None,
) -> Any:
    """A scoring of adapter `name` kept in `cache` under `key` (model role, adapter weights, settings):
    computed once with the adapter active; a result found counts its `count` items done at once, so a
    progress phase still reaches its total."""
    if key not in cache:
        pool.activate(name)
        cache[key] = compute()
    elif on_done is not None:
        on_done(count)
    return cache[key]


@dataclass(frozen=True)
class ValScore:
    """A model on the server's validation split: accuracy (None: a generation task, which is not decoded
    here), loss (choice-level; generation: the teacher-forced loss per response token), examples."""

    acc: float | None
    nll: float
    n: int

    def better_than(self, other: ValScore) -> bool:
        """Higher accuracy; at equal accuracy, lower loss; without accuracies, lower loss (`val_merit`)."""
        return val_merit(self.acc, self.nll) > val_merit(other.acc, other.nll)


class ValTrack:
    """One model's validation scores along a round's distillation (step 0: the round's start); with
    `keep_best`, the adapter of its best score, loaded back at `finish`. Without a validation split
    (`score` None) it scores nothing and the last step is kept."""

    def __init__(
        self,
        pool: AdapterPool,
        name: str,
        score: Callable[[], ValScore] | None,
        log: Callable[[int, ValScore], None],
        every: int,
        keep_best: bool,
    ) -> None:
        self.pool, self.name, self.score, self.log = pool, name, score, log
        self.every, self.keep_best = every, keep_best
        self.steps, self.scored_at = 0, -1
        self.seconds = 0.0  # spent scoring: the selection's share of the round's distillation
        self.best: tuple[ValScore, int, AdapterState | None] | None = None
        self.score_now()

    def score_now(self) -> None:
        if self.score is None or self.scored_at == self.steps:
            return
        t0 = time.perf_counter()
        v = self.score()
        self.seconds += time.perf_counter() - t0
        self.scored_at = self.steps
        self.log(self.steps, v)
        if self.best is None or v.better_than(self.best[0]):
            self.best = (v, self.steps, self.pool.state(self.name) if self.keep_best else None)

    def after_step(self) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            self.score_now()

    def finish(self) -> int | None:
        """Score the last step; with keep_best, load the best adapter back. The step kept (None: last)."""
        self.score_now()
        if self.best is None or not self.keep_best:
            return None
        _, step, state = self.best
        if step != self.steps:
            assert state is not None
            self.pool.load_state(self.name, state)
        return step


@dataclass
class DistillTotals:
    """Sums of one round's distillation losses per model, and the largest teacher signal held."""

    sums: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("slm_ce", "slm_kd", "llm_ce", "llm_kd"), 0.0)
    )
    steps: dict[str, int] = field(default_factory=lambda: {"slm": 0, "llm": 0})
    teacher_bytes: int = 0

    def add(self, role: Role, ce: float, kd: float, nbytes: int) -> None:
        self.sums[f"{role}_ce"] += ce
        self.sums[f"{role}_kd"] += kd
        self.steps[role] += 1
        self.teacher_bytes = max(self.teacher_bytes, nbytes)

    def record(
        self, r: int, topk: int | None, wall_s: float, kept: Mapping[Role, int | None], val_s: float
    ) -> DistillRecord:
        m = {k: v / max(1, self.steps[k[:3]]) for k, v in self.sums.items()}
        return DistillRecord(
            round=r,
            step=self.steps["slm"],
            slm_ce=m["slm_ce"],
            slm_kd=m["slm_kd"],
            llm_ce=m["llm_ce"],
            llm_kd=m["llm_kd"],
            teacher_bytes=self.teacher_bytes,
            topk=topk,
            wall_s=wall_s,
            val_s=val_s,
            slm_kept=kept.get("slm"),
            llm_kept=kept.get("llm"),
        )


@dataclass
class Server:
    """What only the server holds: the SLM pool (theta and a slot per client, for evaluating their
    adapters), the LLM pool, and the learners that train theta and omega on the server."""

    slm: AdapterPool
    llm: AdapterPool | None
    theta: Learner  # the SLM adapter on D_a (distillation)
    omega: Learner | None  # the LLM adapter on D_a (distillation) or on all data (centralized)
    tokenizer: PreTrainedTokenizerBase
    central_steps: int  # the centralized baseline's LLM steps per round
    distill_batches: int  # distillation batches per pass over D_a
    bridge: TokenizerBridge | None = None  # an LLM of another tokenizer: its tokenizer and the map to it

    def tokenizer_of(self, role: Role) -> PreTrainedTokenizerBase:
        """The tokenizer `role`'s model reads: each model its own."""
        return self.bridge.llm_tokenizer if role == "llm" and self.bridge is not None else self.tokenizer


@dataclass(frozen=True)
class Trained:
    """What a round's local training hands to its aggregation: theta as broadcast (None: nothing is
    broadcast), the checked uploads by client, and their mean when the transport computed it (SecAgg+)."""

    payload: AdapterState | None
    updates: dict[int, AdapterState]
    mean: AdapterState | None


# scores by (kind, model role, adapter weights, settings): see Scorer
EvalCache = dict[Any, "MCResult | GenEval | ValScore"]


class Scorer:
    """Scoring of the server's adapters (test split and validation split alike): multiple-choice, or for
    a generation task decoding (`generated`) and the teacher-forced response loss (`response_loss`)."""

    def __init__(self, cfg: ExperimentConfig, server: Server) -> None:
        self.cfg, self.server = cfg, server
        self.generation = cfg.task is not None and cfg.task.kind == "generation"

    def requests(
        self, examples: Sequence[Any], to_decode: bool = True, role: Role = "slm"
    ) -> list[GenRequest]:
        """Generation examples as the evaluator takes them: encoded as training encodes them (template,
        `fit_lengths`) by `role`'s tokenizer; `to_decode`, each prompt then cut from the left to leave
        room for task.max_new_tokens in the shorter context of the server's models (the SLM and the LLM
        are given the same prompts)."""
        task, s = self.cfg.task, self.server
        assert task is not None
        encoded = gen_requests(s.tokenizer_of(role), examples, task.max_length, task.chat_template)
        if not to_decode:
            return encoded
        limits = [context_length(p.model) for p in (s.slm, s.llm) if p is not None]
        known = [n for n in limits if n is not None]
        return fit_context(encoded, min(known) if known else None, task.max_new_tokens)

    def generated(
        self,
        pool: AdapterPool,
        name: str,
        requests: Sequence[GenRequest],
        cache: EvalCache,
        on_done: OnDone | None = None,
    ) -> GenEval:
        """`evaluate_generation` of adapter `name` on `requests` (at most task.max_test_examples), kept in
        `cache` as `scored` keeps multiple-choice results: an adapter already scored is not rescored."""
        t, task = self.cfg.train, self.cfg.task
        assert task is not None
        limit = task.max_test_examples
        settings = (task.max_length, task.chat_template, task.max_new_tokens, limit, t.eval_batch_size)
        key = ("gen", self.role(pool), adapter_digest(pool, name), *settings)
        tok = self.server.tokenizer_of(self.role(pool))

        def compute() -> GenEval:
            return evaluate_generation(
                pool.model,
                requests,
                batch_size=t.eval_batch_size,
                max_new_tokens=task.max_new_tokens,
                stop_ids=stop_token_ids(pool.model, tok),
                pad_id=pad_token_id(tok),
                decode=lambda ids: str(tok.decode(ids, skip_special_tokens=True)),
                max_examples=limit,
                on_done=on_done,
            )

        result = cached(cache, key, pool, name, compute, generation_count(requests, limit), on_done)
        assert isinstance(result, GenEval)
        return result

    def response_loss(
        self,
        pool: AdapterPool,
        name: str,
        requests: Sequence[GenRequest],
        cache: EvalCache,
        on_done: OnDone | None = None,
    ) -> ValScore:
        """The teacher-forced loss per response token (stop tokens included) of adapter `name` on
        `requests`, in batches of train.eval_batch_size, longest first; cached as `scored` caches."""
        t, task = self.cfg.train, self.cfg.task
        assert task is not None
        settings = (task.max_length, task.chat_template, t.eval_batch_size)
        key = ("loss", self.role(pool), adapter_digest(pool, name), *settings)

        def compute() -> ValScore:
            pad, size = pad_token_id(self.server.tokenizer_of(self.role(pool))), t.eval_batch_size
            order = length_order([len(r.prompt_ids) + len(r.response_ids) for r in requests])
            total, tokens = 0.0, 0
            for start in range(0, len(order), size):
                chunk = [requests[i] for i in order[start : start + size]]
                for loss, n in response_nll(pool.model, chunk, batch_size=size, pad_id=pad):
                    total, tokens = total + loss, tokens + n
                if on_done is not None:
                    on_done(len(chunk))
            return ValScore(None, total / max(1, tokens), len(requests))

        result = cached(cache, key, pool, name, compute, len(requests), on_done)
        assert isinstance(result, ValScore)
        return result

    def scored(
        self,
        pool: AdapterPool,
        name: str,
        examples: Sequence[MCExample],
        cache: EvalCache,
        on_scored: OnScored | None = None,
    ) -> MCResult:
        """Multiple-choice result of adapter `name` on `examples`, kept in `cache` (one per split) by model
        role, adapter weights and eval settings: an adapter already scored is not rescored (and counts
        as scored at once in `on_scored`, so a phase still reaches its total)."""
        t, task = self.cfg.train, self.cfg.task
        assert task is not None
        key = (self.role(pool), adapter_digest(pool, name), task.max_length, t.eval_batch_size)

        def compute() -> MCResult:
            return evaluate_multiple_choice(
                pool.model,
                self.server.tokenizer_of(self.role(pool)),
                examples,
                batch_size=t.eval_batch_size,
                max_length=task.max_length,
                on_scored=on_scored,
            )

        result = cached(cache, key, pool, name, compute, choice_count(examples), on_scored)
        assert isinstance(result, MCResult)
        return result

    def role(self, pool: AdapterPool) -> Role:
        """Which of the server's two models `pool` is."""
        return "llm" if pool is self.server.llm else "slm"


class Distillation:
    """Step 4 of a FedCoLLM round: mutual distillation of theta (SLM) and omega (LLM) on the server's
    public data D_a, both scored along the way on its validation split (`ValTrack`). For the fedavg_ft
    control (no LLM) the same SLM steps with cross-entropy alone (lambda = 0), scored and kept alike."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        server: Server,
        task: TaskData,
        scorer: Scorer,
        log: Callable[[Record], None],
        activity: Activity,
    ) -> None:
        self.cfg, self.server, self.task, self.scorer = cfg, server, task, scorer
        self.log, self.activity = log, activity
        self.with_llm = plan_of(cfg.algorithm).distill  # the LLM teaches and learns; else theta alone (CE)
        self.roles: tuple[Role, ...] = ROLES if self.with_llm else ("slm",)
        self.vocab_size = len(server.tokenizer)
        self.val_cache: EvalCache = {}  # validation results, keyed as `Scorer.scored` keys
        self.val_requests: dict[Role, list[GenRequest]] = {}  # a generation task's validation split, encoded
        self.coverage: dict[Role, Coverage] = {}  # a round's alignment figures by student (another tokenizer)

    def run(self, r: int) -> None:
        """Per batch an SLM step (the LLM teaches) then an LLM step (the SLM teaches); with order 'epoch'
        a full SLM pass then a full LLM pass. The server's validation split scores both models along the
        way; with keep 'best' each ends the round with its best-scored adapter. Without the LLM (fedavg_ft)
        only the SLM steps run, each as FedCoLLM's with lambda = 0."""
        s, d = self.server, self.cfg.distill
        assert s.omega is not None or not self.with_llm
        if d.reset_optimizer:  # theta was just replaced by the average: last round's moments describe another
            s.theta.reset_optimizer()
            if s.omega is not None:
                s.omega.reset_optimizer()
        totals, t0 = DistillTotals(), time.perf_counter()
        order = self.distill_order(self.distill_batches())
        what = "mutual distillation" if self.with_llm else "server fine-tuning (cross-entropy, λ = 0)"
        with self.activity.phase(f"round {r} · {what}", d.epochs * len(order)) as advance:
            tracks = {
                role: self.val_track(r, role, advance) for role in self.roles
            }  # scores the round's start
            for epoch in range(d.epochs):
                if epoch:
                    order = self.distill_order(self.distill_batches())
                for role, batch in order:
                    ce, kd, nbytes = self.distill_step(role, batch)
                    totals.add(role, ce, kd, nbytes)
                    tracks[role].after_step()
                    advance(note=f"{role.upper()} ce {ce:.3f} kd {kd:.3f}")
            kept = {role: track.finish() for role, track in tracks.items()}
        val_s = sum(track.seconds for track in tracks.values())
        self.log(totals.record(r, d.topk, time.perf_counter() - t0, kept, val_s))
        self.log_coverage(r)

    def log_coverage(self, r: int) -> None:
        """The round's alignment figures (an LLM of another tokenizer), one record per student model."""
        bridge = self.server.bridge
        if bridge is None:
            return
        slm_matched, llm_matched = bridge.vocab.matched()
        for role, cov in sorted(self.coverage.items()):
            self.log(
                AlignRecord(
                    round=r,
                    model=role,
                    positions=cov.positions,
                    paired=cov.paired,
                    exact_share=cov.exact_share,
                    merged=cov.merged,
                    unaligned=cov.unaligned,
                    carried_share=cov.carried_share,
                    unmatched_share=cov.unmatched_share,
                    empty=cov.empty,
                    vocab_matched=slm_matched if role == "llm" else llm_matched,
                    map_digest=bridge.vocab.digest,
                    map_s=bridge.seconds,
                )
            )
        self.coverage = {}

    def distill_batches(self) -> list[Batch]:
        """One pass over D_a: the public batches of this round, from theta's data cursor."""
        return [b for _ in range(self.server.distill_batches) for b in self.server.theta.next_batches()[0]]

    def distill_order(self, batches: list[Batch]) -> list[tuple[Role, Batch]]:
        if self.cfg.distill.order == "batch":  # SLM step then LLM step on each batch
            return [(role, b) for b in batches for role in self.roles]
        return [(role, b) for role in self.roles for b in batches]  # a full SLM pass, then a full LLM pass

    def distill_step(self, role: Role, batch: Batch) -> tuple[float, float, int]:
        """One step of `role` (student) against the other model (teacher): (ce, kd, teacher signal bytes).
        Without the LLM (fedavg_ft) theta's step has no teacher: the same step, cross-entropy alone."""
        s, d = self.server, self.cfg.distill
        assert isinstance(batch, Mapping)
        s.slm.activate(SERVER)
        if not self.with_llm:
            student, learner, signal = s.slm, s.theta, TeacherSignal()
        else:
            assert s.llm is not None and s.omega is not None
            if role == "slm":
                student, teacher, learner = s.slm, s.llm, s.theta
            else:
                student, teacher, learner = s.llm, s.slm, s.omega
            s.llm.activate(LLM_ADAPTER)
            if s.bridge is not None:  # another tokenizer: each model reads its own encoding of the batch
                signal, batch = self.crossed(role, teacher.model, batch)
            else:
                signal = teacher_signal(teacher.model, batch, self.vocab_size, d.topk, d.kd_target)
        with learner.rng.active():  # the student's dropout: its learner's own stream
            ce, kd = student_step(
                student.model,
                signal,
                batch,
                learner.optimizer,
                learner.scheduler,
                d,
                self.vocab_of(role),
                self.cfg.train.max_grad_norm,
            )
        return ce, kd, signal.nbytes

    def vocab_of(self, role: Role) -> int:
        """The logits' columns `role`'s model is trained over: its tokenizer's vocabulary."""
        return len(self.server.tokenizer_of(role))

    def crossed(
        self, role: Role, teacher: torch.nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> tuple[TeacherSignal, Mapping[str, torch.Tensor]]:
        """The teacher's signal for `role` (student) when the LLM has another tokenizer, and the student's
        batch: the public batch as the SLM's encoding (`batch`, whose "rows" name its examples) and the
        LLM's (`task.llm_public`), paired by their text (`training.distill.crossed_signal`); its coverage
        summed into the round's."""
        bridge, d, public = self.server.bridge, self.cfg.distill, self.task.llm_public
        assert bridge is not None and public is not None
        slm_batch: Mapping[str, torch.Tensor] = batch
        llm_batch: Mapping[str, torch.Tensor] = public.batch(batch["rows"], batch["input_ids"].device)
        if role == "slm":
            pieces, to_student, student_batch, teacher_batch = (
                (bridge.slm_pieces, bridge.llm_pieces),
                bridge.llm_to_slm,
                slm_batch,
                llm_batch,
            )
        else:
            pieces, to_student, student_batch, teacher_batch = (
                (bridge.llm_pieces, bridge.slm_pieces),
                bridge.slm_to_llm,
                llm_batch,
                slm_batch,
            )
        teacher_vocab = self.vocab_of("llm" if role == "slm" else "slm")
        signal, cov = crossed_signal(
            teacher, teacher_batch, student_batch, pieces, to_student, teacher_vocab, d.topk, d.temperature
        )
        self.coverage.setdefault(role, Coverage()).add(cov)
        return signal, student_batch

    def val_track(self, r: int, role: Role, advance: Advance) -> ValTrack:
        """`role`'s validation track; a scoring shows on the distillation phase (its count is in steps)
        as a note of the validation choices (generation: examples) scored so far."""
        s = self.server
        pool, name = (s.slm, SERVER) if role == "slm" else (s.llm, LLM_ADAPTER)
        assert pool is not None
        d = self.cfg.distill
        generation = self.scorer.generation
        of = len(self.task.public_val) if generation else choice_count(self.task.public_val)
        unit = "examples" if generation else "choices"

        def score() -> ValScore:
            done = 0

            def scored(n: int) -> None:
                nonlocal done
                done += n
                advance(0, note=f"{role.upper()} validation {done}/{of} {unit}")

            return self.val_score(pool, name, scored)

        def log(step: int, v: ValScore) -> None:
            self.log(DistillValRecord(round=r, model=role, step=step, acc=v.acc, nll=v.nll, n=v.n))

        return ValTrack(
            pool, name, score if self.task.public_val else None, log, d.val_every or 1, d.keep == "best"
        )

    def val_score(self, pool: AdapterPool, name: str, on_scored: OnScored | None = None) -> ValScore:
        """Accuracy and choice-level loss of adapter `name` on the server's validation split (generation:
        the teacher-forced response loss, no accuracy); weights already scored are not rescored (omega
        starts a round as the last one kept)."""
        examples, role = self.task.public_val, self.scorer.role(pool)
        if self.scorer.generation:
            if role not in self.val_requests:  # scored as trained
                self.val_requests[role] = self.scorer.requests(examples, to_decode=False, role=role)
            return self.scorer.response_loss(pool, name, self.val_requests[role], self.val_cache, on_scored)
        res = self.scorer.scored(pool, name, examples, self.val_cache, on_scored)
        return ValScore(res.acc, choice_nll(res.logliks, [ex.answer for ex in examples]), res.n)


class FedCoLLMLoop:
    """FedCoLLM's rounds (or a baseline's) over any `Clients` transport."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        clients: Clients,
        server: Server,
        task: TaskData,
        files: RunFiles,
        console: Console | None = None,
        eval_cache: EvalCache | None = None,
    ) -> None:
        self.cfg, self.clients, self.server, self.task, self.files = cfg, clients, server, task, files
        self.console = console or Console(stderr=True)
        # Test accuracy by (model, adapter weights, eval settings): run.compare variants share one,
        # so the zero-shot evaluation that every variant starts with runs once, not once each.
        self.eval_cache = eval_cache if eval_cache is not None else {}
        self.plan = plan_of(cfg.algorithm)
        if self.plan.uses_llm and (server.llm is None or server.omega is None):
            raise ValueError(f"algorithm '{cfg.algorithm}' needs the server LLM")
        self.n = cfg.federation.clients
        self.full_slm_bytes = server.slm.base_bytes()
        self.compression = Compression.of(cfg)  # federation.compress: how theta and the updates travel
        initial = server.slm.state(SERVER)
        self.slm_shapes = {k: v.shape for k, v in initial.items()}
        self.client_adapters: dict[int, AdapterState] = {k: dict(initial) for k in range(self.n)}
        self.pipeline = AggregationPipeline(cfg, files.log)
        self.sizes: list[int] = [0] * self.n  # n_k as each client described itself
        self.members = Membership(cfg, files.log, self.console)
        self.activity = Activity(self.console)
        self.scorer = Scorer(cfg, server)
        self.distillation = Distillation(cfg, server, task, self.scorer, files.log, self.activity)
        self.test_requests: dict[Role, list[GenRequest]] = {}  # a generation task's test split, encoded once

    def check(self, payload: dict[str, torch.Tensor] | Any) -> None:
        """Only the SLM adapter travels: refuse anything else (above all the server's LLM LoRA)."""
        check_payload(payload, self.slm_shapes)

    # ---- the loop (its order: runtime/rounds.py) ----------------------------------------------------
    def run(self, resume: bool = False) -> None:
        run_rounds(self, resume)

    @property
    def rounds(self) -> int:
        return self.cfg.federation.rounds if self.plan.trains else 0

    def join(self) -> None:
        """Admit the clients that answer, with n_k as each described itself (FedAvg's weights)."""
        self.members.join(self.clients.describe())
        expected = [len(part) for part in self.task.clients]
        self.sizes = checked_sizes(self.cfg, self.members.joined, expected, self.files.log)

    def client_names(self) -> list[str] | None:
        return None

    def duplicates(self) -> dict[str, int] | None:
        return {"documents": self.task.duplicate_documents, "examples": self.task.duplicates}

    def end_event(self) -> RunEvent:
        return RunEvent(event="end", algorithm=self.cfg.algorithm)

    def close_round(self, r: int, times: RoundTimes) -> tuple[RoundRecord, str]:
        record = RoundRecord(round=r, step=r, wall_s=times.wall_s, train_s=times.train_s)
        shown = self.shown(r) if self.cfg.is_eval_round(r) else ""
        return record, f"round {r}/{self.rounds}  {shown}  ({times.wall_s:.1f}s)"

    # ---- the round ------------------------------------------------------------------------------------
    def train(self, r: int) -> Trained:
        """1. broadcast theta (SLM adapter keys only); 2. local training on private data (answer-only
        loss): the payload sent, the checked uploads by client, and a mean the transport computed."""
        payload = self.server.slm.state(SERVER) if self.plan.broadcast else None
        if payload is not None:
            self.check(payload)
            if not self.compression.off:  # the server's reply leaves it encoded: what the clients decode
                payload = roundtrip_state(payload, self.compression)
        if not self.plan.local_training:
            return Trained(payload, {}, None)
        return Trained(payload, *self.train_clients(r, payload))

    def aggregate(self, r: int, trained: Trained) -> None:
        """3. upload + weighted FedAvg -> theta^{t,0}; 4. mutual distillation on D_a (the distilled theta
        is broadcast next round); or the centralized baseline's LLM steps."""
        plan, payload = self.plan, trained.payload
        if plan.local_training and plan.aggregate:
            assert payload is not None
            updates, mean = trained.updates, trained.mean
            self.log_traffic(r, updates, payload)
            if mean is None:
                ks = sorted(updates)
                mean = self.pipeline.fedavg(
                    r, self.n, ks, [updates[k] for k in ks], payload, self.sizes, self.check
                )
            self.check(mean)
            self.server.slm.load_state(SERVER, mean)
        if plan.server_steps:
            self.distill(r)
        if plan.central_llm:
            omega, steps = self.server.omega, self.server.central_steps
            assert omega is not None
            with self.activity.phase(f"round {r} · LLM on the union of the data", steps) as advance:
                loss = omega.train(steps, lambda loss: advance(note=f"loss {loss:.3f}")).mean_loss
            self.files.log(TrainRecord(model="llm", round=r, client=None, loss=loss, lr=omega.lr))

    def distill(self, r: int) -> None:
        """4. mutual distillation on D_a (`Distillation`; fedavg_ft: theta's steps alone, lambda = 0); the
        theta it keeps is broadcast next round."""
        self.distillation.run(r)

    def train_clients(
        self, r: int, payload: AdapterState | None
    ) -> tuple[dict[int, AdapterState], AdapterState | None]:
        """Each client trains theta (or, standalone, its own adapter); their checked uploads by client."""
        sent = {k: payload if payload is not None else self.client_adapters[k] for k in self.members.active()}
        secure = None
        if self.cfg.federation.secure_aggregation and self.plan.aggregate:
            w = fedavg_weights([self.sizes[k] for k in sent], self.cfg.federation.weighting)
            secure = dict(zip(sent, w, strict=True))
        fed = self.cfg.federation
        total = None if fed.local_epochs is not None else fed.local_steps * len(sent)  # epochs: steps vary
        with self.activity.phase(f"round {r}/{fed.rounds} · client training", total) as advance:
            replies = self.clients.train(
                r,
                sent,
                None,
                lambda k, loss: advance(note=f"{client_name(k)} loss {loss:.3f}"),
                secure_weights=secure,
            )
        check_trained(self.cfg, r, {k: (up.report.loss, up.adapter, sent[k]) for k, up in replies.ok.items()})
        for k, up in list(replies.ok.items()):
            try:
                self.check(up.adapter)
            except ValueError as e:
                del replies.ok[k]
                replies.failed[k] = f"refused upload: {e}"
        self.members.note_failures(r, "train", replies)
        self.client_adapters.update(sent)  # a dropped client keeps what it was sent
        updates = {}
        for k, up in sorted(replies.ok.items()):
            self.client_adapters[k] = copied(up.adapter)  # kept past the client's next exchange
            updates[k] = up.adapter
            self.files.log(TrainRecord(model="slm", round=r, client=k, loss=up.report.loss, lr=up.report.lr))
        return updates, replies.mean

    def log_traffic(self, r: int, updates: dict[int, AdapterState], payload: AdapterState) -> None:
        """theta down to each client that trained, its update back up (as encoded, with compression)."""
        traffic = Traffic(self.full_slm_bytes, compression=self.compression)
        traffic.down(dict.fromkeys(updates, traffic.adapter_bytes(payload)))
        traffic.up({k: traffic.update_bytes(u) for k, u in updates.items()})
        for comm in traffic.records(r):
            self.files.log(comm)

    # ---- evaluation -----------------------------------------------------------------------------------
    def evaluation_targets(self, r: int) -> list[tuple[Role, int | None]]:
        """What round r's evaluation scores, in order: (model, client), client None for the server's."""
        plan, targets = self.plan, list[tuple[Role, int | None]]()
        if r == 0 or plan.local_training:
            per_client = plan.local_training and not plan.aggregate and r > 0  # standalone
            targets += [("slm", client) for client in (range(self.n) if per_client else [None])]
        if self.server.llm is not None and (r == 0 or plan.uses_llm):
            targets.append(("llm", None))
        return targets

    def logged_scores(self, r: int) -> dict[tuple[Role, int | None], float]:
        """Round r's test scores already in the metrics (a resumed round's), by (model, client): the
        accuracies, or a generation task's ROUGE-L."""
        if self.scorer.generation:
            logged = [g for g in self.files.logged(GenRecord, r) if g.split == "test" and g.model is not None]
            return {(g.model, g.client): g.rouge_l for g in logged if g.model is not None}
        return {(m.model, m.client): m.acc for m in self.files.logged(McRecord, r)}

    def per_target(self) -> int:
        """What one model's test evaluation counts in the progress display: the test split's choices
        (multiple choice) or the examples it generates for (generation)."""
        task = self.cfg.task
        assert task is not None
        if self.scorer.generation:
            return generation_count(self.generation_requests(), task.max_test_examples)
        return choice_count(self.task.test)

    def generation_requests(self, role: Role = "slm") -> list[GenRequest]:
        """The test split as generation requests for `role`'s model (encoded by its tokenizer, once)."""
        if role not in self.test_requests:
            self.test_requests[role] = self.scorer.requests(self.task.test, role=role)
        return self.test_requests[role]

    def evaluate(self, r: int) -> None:
        """The held-out test split scored for whatever this algorithm trains (multiple-choice accuracy, or
        generations judged against the references), shown as a phase counted in the split's choices
        (generation: examples) per model to score; a result already in the metrics (a resumed round's)
        is not computed again."""
        s, logged = self.server, self.logged_scores(r)
        todo = [t for t in self.evaluation_targets(r) if t not in logged]
        total = len(todo) * self.per_target() if todo else None  # None: all logged, nothing to score
        log = self.log_gen if self.scorer.generation else self.log_mc
        description = f"round {r}/{self.cfg.federation.rounds} · evaluation on the test split"
        with self.activity.phase(description, total) as on_scored:
            for role, client in todo:
                if role == "llm":
                    assert s.llm is not None
                    log(r, s.llm, LLM_ADAPTER, None, on_scored)
                    continue
                name = SERVER if client is None else client_name(client)
                if client is not None:
                    s.slm.load_state(name, self.client_adapters[client])
                log(r, s.slm, name, client, on_scored)

    def shown(self, r: int) -> str:
        """Round r's scores as the console line shows them (the mean SLM score, the LLM's): accuracy, or
        a generation task's ROUGE-L."""
        targets, logged, shown = self.evaluation_targets(r), self.logged_scores(r), []
        metric = "ROUGE-L" if self.scorer.generation else "acc"
        scores = [logged[t] for t in targets if t[0] == "slm" and t in logged]
        if scores:
            shown.append(f"SLM {metric} {sum(scores) / len(scores):.3f}")
        if ("llm", None) in logged:
            shown.append(f"LLM {metric} {logged['llm', None]:.3f}")
        return "  ".join(shown)

    def log_gen(
        self, r: int, pool: AdapterPool, name: str, client: int | None, on_done: OnDone | None = None
    ) -> float:
        """Adapter `name` generating for the test split, logged as a GenRecord of its scores (the generated
        texts may repeat what a client trained on: only a task of shipped public data logs a few of them,
        at the final round, `log_samples`); its ROUGE-L."""
        requests = self.generation_requests(self.scorer.role(pool))
        res = self.scorer.generated(pool, name, requests, self.eval_cache, on_done)
        if r == self.rounds:
            self.log_samples(r, self.scorer.role(pool), client, requests, res)
        self.files.log(GenRecord.of(res, round=r, model=self.scorer.role(pool), client=client, split="test"))
        return res.rouge_l

    def log_samples(
        self, r: int, model: Role, client: int | None, requests: Sequence[GenRequest], res: GenEval
    ) -> None:
        """A few test examples with the model's generations (`gen_samples`), only when the task is built
        from a shipped corpus (task.shows_samples): never a user's examples. Logged before the model's
        GenRecord, so a resumed round that finds the scores finds the samples too."""
        task = self.cfg.task
        assert task is not None
        if not task.shows_samples:
            return
        for sample in gen_samples(requests, res.predictions):
            self.files.log(
                GenSampleRecord(
                    round=r,
                    model=model,
                    client=client,
                    split="test",
                    example=sample.example,
                    prompt=sample.prompt,
                    reference=sample.reference,
                    generated=sample.generated,
                )
            )

    def log_mc(
        self, r: int, pool: AdapterPool, name: str, client: int | None, on_scored: OnScored | None = None
    ) -> float:
        res = self.scorer.scored(pool, name, self.task.test, self.eval_cache, on_scored)  # test split
        self.files.log(
            McRecord(
                round=r,
                model=self.scorer.role(pool),
                client=client,
                acc=res.acc,
                acc_norm=res.acc_norm,
                n=res.n,
            )
        )
        return res.acc

    # ---- state ----------------------------------------------------------------------------------------
    def checkpoint(self, r: int, scaffold: Mapping[str, Any]) -> None:
        s = self.server
        writers: dict[str, Callable[[Path], None]] = {
            client_name(k): partial(s.slm.save, client_name(k), state=self.client_adapters[k])
            for k in range(self.n)
        }
        writers[SERVER] = partial(s.slm.save, SERVER)
        if s.llm is not None:
            writers[LLM_ADAPTER] = partial(s.llm.save, LLM_ADAPTER)
        learners = {"theta": s.theta.state_dict()}
        if s.omega is not None:
            learners["omega"] = s.omega.state_dict()
        state = {
            "step": r,
            "clients": self.clients.state_dict(),
            "server": learners,
            **scaffold,
        }
        self.files.checkpoint(r, writers, state)

    def restore(self) -> tuple[int, Mapping[str, Any]]:
        s = self.server
        slm = AdapterSpec.of(s.slm.view(SERVER))
        expected = {client_name(k): slm for k in range(self.n)} | {SERVER: slm}
        if s.llm is not None:
            expected[LLM_ADAPTER] = AdapterSpec.of(s.llm.view(LLM_ADAPTER))
        r, path, state = self.files.resume(expected)
        device = s.theta.device
        for k in range(self.n):
            self.client_adapters[k] = {
                key: v.to(device) for key, v in load_adapter(path / client_name(k)).items()
            }
        s.slm.load_state(SERVER, load_adapter(path / SERVER))
        s.theta.load_state_dict(state["server"]["theta"])
        if s.llm is not None and s.omega is not None:
            s.llm.load_state(LLM_ADAPTER, load_adapter(path / LLM_ADAPTER))
            s.omega.load_state_dict(state["server"]["omega"])
        self.clients.load_state_dict(state["clients"])
        return r, state
