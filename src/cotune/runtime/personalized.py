"""The round loop of personalized collaborative fine-tuning (SPEC B), written once for every transport.

Every client keeps its own LoRA. Each round: every client trains its adapter locally; the loop
gathers the evidence its trust strategy needs (the adapters, peers' perplexity on each client's
validation data, or top-k predictions on a shared public set); the aggregation pipeline screens the
uploads and mixes them with the trust matrix; a checkpoint is written; the clients evaluate (the
order and the resume rule are `runtime/rounds.py`'s, the same for FedCoLLM). The loop owns every
client's adapter and asks its `Clients` port for the work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Set
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console

from cotune.algorithms.compression import Compression, roundtrip_state
from cotune.algorithms.personalized import TrustEvidence
from cotune.algorithms.ranks import flora_stack, rank_of, rank_slice, resize_rank
from cotune.algorithms.trust import PredictionDistance
from cotune.config.schema import ExperimentConfig
from cotune.evaluation.generation import SAMPLES, cut
from cotune.evaluation.lm import LMEval
from cotune.models.adapter_check import AdapterSpec
from cotune.models.lora import wide_initialisation
from cotune.records import (
    SAMPLE_PROMPT_CHARS,
    SAMPLE_TEXT_CHARS,
    CommRecord,
    EvalRecord,
    GenRecord,
    GenSampleRecord,
    RoundRecord,
    RunEvent,
    Split,
    TrainRecord,
    TrustRecord,
)
from cotune.reporting.progress import Activity, Advance
from cotune.runtime.membership import Membership
from cotune.runtime.pipeline import AggregationPipeline, check_trained
from cotune.runtime.port import ClientInfo, Clients, GenScores, OnDone, Prediction
from cotune.runtime.rounds import RoundTimes, run_rounds
from cotune.runtime.rundir import RunFiles, client_name, load_adapter
from cotune.runtime.traffic import Traffic
from cotune.seeds import torch_generator
from cotune.state import AdapterState, copied

SaveAdapter = Callable[[AdapterState, Path], None]  # writes one adapter in PEFT format
# The evidence that takes an exchange with every client (one answer each): the aggregation's progress unit
CLIENT_EVIDENCE = frozenset({"perplexity", "prediction_distance"})


def prediction_distance(predictions: list[Prediction], k: int) -> torch.Tensor:
    """D[i, j] from the clients' top-k logits on the same public batches, batch by batch."""
    if len({p.public_hash for p in predictions}) > 1:
        raise ValueError(
            "the clients do not have the same public reference set, so their predictions cannot be "
            "compared: build it from the same config (or give every node the same public-path)"
        )
    dist = PredictionDistance(len(predictions), k=k)
    for b in range(len(predictions[0].topk)):
        dist.add_topk([p.topk[b] for p in predictions])
    return dist.distances()


def label_mixtures(infos: list[ClientInfo]) -> torch.Tensor:
    """Clients x labels, from each client's (label_names, mixture) description (the oracle's evidence)."""
    names: list[str] = []
    for info in infos:
        names += [n for n in info.label_names if n not in names]
    m = torch.zeros(len(infos), len(names))
    for a, info in enumerate(infos):
        for name, x in zip(info.label_names, info.mixture, strict=True):
            m[a, names.index(name)] = x
    return m


class PersonalizedLoop:
    """Rounds of local training and trust-weighted aggregation over any `Clients` transport."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        clients: Clients,
        initial: AdapterState,
        save_adapter: SaveAdapter,
        files: RunFiles,
        console: Console | None,
        model_bytes: int,
        dropped: dict[str, int] | None = None,
    ) -> None:
        """`model_bytes`: the base model's size, what the traffic records compare each client's bytes to;
        `dropped`: the data's duplicates dropped before the split, where this process built the data."""
        self.cfg, self.clients, self.files = cfg, clients, files
        self.dropped = dropped
        # this round's bytes to and from each client (local: zeros, nothing of a client travels)
        self.compression = Compression.of(cfg)
        self.traffic = Traffic(model_bytes, travels=cfg.strategy.spec.exchanges, compression=self.compression)
        self.save_adapter = save_adapter
        self.console = console or Console(stderr=True)
        self.n = cfg.federation.clients
        # every client starts from `initial` (the pool's widest initialisation) cut to its own rank
        self.adapters: list[AdapterState] = [
            dict(initial) if cfg.lora.ranks is None else resize_rank(initial, cfg.lora.rank_of(i))
            for i in range(self.n)
        ]
        self.adapters = self.replied(self.adapters)  # they reach the clients as the codec encodes them
        # FLoRA: the aggregates merged into every client's base so far, stacked (None: the original base)
        self.merging = cfg.strategy.spec.merge != "none"
        self.base: AdapterState | None = None
        self.pipeline = AggregationPipeline(cfg, files.log)
        self.members = Membership(cfg, files.log, self.console)
        self.activity = Activity(self.console)

    # ---- schedule -------------------------------------------------------------------------------------
    def steps_in_round(self, round_: int) -> int:
        fed = self.cfg.federation
        return fed.local_steps + (fed.warmup_steps if round_ == 1 else 0)

    def step_at_end(self, round_: int) -> int:
        fed = self.cfg.federation
        return 0 if round_ == 0 else fed.warmup_steps + round_ * fed.local_steps

    def client_names(self) -> list[str]:
        """Each client by its data: its main label (what a report shows next to the index)."""
        names = []
        for i in range(self.n):
            info = self.members.joined.get(i)
            mixture, labels = (info.mixture, info.label_names) if info is not None else ((), ())
            names.append(labels[max(range(len(mixture)), key=mixture.__getitem__)] if mixture else "")
        return names

    def duplicates(self) -> dict[str, int] | None:
        return self.dropped

    # ---- the loop (its order: runtime/rounds.py) ----------------------------------------------------
    def run(self, resume: bool = False) -> None:
        run_rounds(self, resume)

    @property
    def rounds(self) -> int:
        return self.cfg.federation.rounds

    def join(self) -> None:
        self.members.join(self.clients.describe())

    def end_event(self) -> RunEvent:
        return RunEvent(event="end", strategy=self.cfg.strategy.name)

    def train(self, r: int) -> list[AdapterState]:
        """The round's local training, shown as a phase counted in steps; every client's adapter as the
        round started (what a rejected upload falls back to). The round's traffic counts start here."""
        self.traffic.new_round()
        total = self.steps_in_round(r) * len(self.members.active())
        with self.activity.phase(f"round {r}/{self.rounds} · training", total) as advance:
            return self.train_clients(
                r, lambda client, loss: advance(note=f"{client_name(client)} loss {loss:.3f}")
            )

    def aggregate(self, r: int, round_start: list[AdapterState]) -> None:
        """`mix`, shown as a phase counted in the clients' answers to the evidence exchanges."""
        exchanges = len(self.cfg.strategy.spec.evidence & CLIENT_EVIDENCE)
        answers = exchanges * len(self.members.active()) or None  # None: no exchange, nothing to count
        description = f"round {r}/{self.rounds} · aggregation ({self.cfg.strategy.name})"
        with self.activity.phase(description, answers) as advance:
            self.mix(r, round_start, advance)

    def evaluate(self, r: int) -> None:
        """Each present client's validation (and test) metrics, those not logged yet (a resumed round's),
        shown as a phase counted in clients, or with generation data in the test examples they decode
        (`eval_units`)."""
        logged: set[tuple[int, str]] = {(e.client, e.split) for e in self.files.logged(EvalRecord, r)}
        logged |= {(i, "gen") for i in self.generated(r)}
        present = self.members.present()
        clients = [i for i in present if any((i, split) not in logged for split in self.eval_splits(i))]
        # those the stopped run evaluated were sent their adapter too: the round's traffic counts them
        self.traffic.down(
            {i: self.traffic.adapter_bytes(self.adapters[i]) for i in present if i not in clients}
        )
        what = "evaluation before training" if r == 0 else "evaluation"
        units = self.eval_units(clients)
        with self.activity.phase(f"round {r}/{self.rounds} · {what}", sum(units.values())) as advance:
            if clients:
                self.evaluate_clients(r, clients, logged, lambda i: advance(units[i], note=client_name(i)))

    def eval_units(self, clients: list[int]) -> dict[int, int]:
        """What each client's evaluation counts in the progress display, once its answer is in (the unit
        every transport can count): with generation data, the test examples it decodes (its test split,
        capped by data.max_test_windows: decoding is what takes the time); else, or when none of them
        decodes anything, one per client."""
        if self.cfg.data.kind == "generation":
            examples = {i: self.test_examples(i) for i in clients}
            if any(examples.values()):
                return examples
        return dict.fromkeys(clients, 1)

    def test_examples(self, client: int) -> int:
        """The test examples a client described (`ClientInfo.test_windows`; 0 when it has none)."""
        info = self.members.joined.get(client)
        return (info.test_windows or 0) if info is not None else 0

    def eval_splits(self, client: int) -> tuple[Literal["val", "test", "gen"], ...]:
        """The splits a client's evaluation reports: validation, and test when it has test windows (with
        generation data, "gen": its test generations too)."""
        info = self.members.joined.get(client)
        if info is None or not info.test_windows:
            return ("val",)
        return ("val", "test", "gen") if self.cfg.data.kind == "generation" else ("val", "test")

    def close_round(self, r: int, times: RoundTimes) -> tuple[RoundRecord, str]:
        """The round's traffic (its evaluation's messages included), then its record and console line:
        the mean training loss and, on evaluation rounds, the mean validation perplexity (from the
        round's logged records, so a resumed round reads what its stopped run logged)."""
        if not self.files.logged(CommRecord, r):
            for comm in self.traffic.records(r):
                self.files.log(comm)
        losses = [t.loss for t in self.files.logged(TrainRecord, r)]
        ppls = [e.ppl for e in self.files.logged(EvalRecord, r) if e.split == "val"]
        mean_ppl = sum(ppls) / max(1, len(ppls)) if self.cfg.is_eval_round(r) else None
        step = self.step_at_end(r)
        record = RoundRecord(
            round=r,
            step=step,
            wall_s=times.wall_s,
            train_s=times.train_s,
            mean_val_ppl=mean_ppl,
            participants=self.members.active(),
        )
        text = f"train loss {sum(losses) / max(1, len(losses)):.3f}"
        text += f"  mean val ppl {mean_ppl:.2f}" if mean_ppl is not None else ""
        rouge = [g.rouge_l for g in self.files.logged(GenRecord, r)]
        text += f"  mean test ROUGE-L {sum(rouge) / len(rouge):.3f}" if rouge else ""
        return record, f"round {r}/{self.rounds}  step {step}  {text}  ({times.wall_s:.1f}s)"

    # ---- phases ---------------------------------------------------------------------------------------
    def train_clients(self, r: int, on_step: Callable[[int, float], None]) -> list[AdapterState]:
        """Every active client trains its adapter; their uploads replace the loop's copies for now."""
        round_start = list(self.adapters)
        replies = self.clients.train(r, self.send(self.members.active()), self.steps_in_round(r), on_step)
        self.members.note_failures(r, "train", replies)
        trained = {i: (up.report.loss, up.adapter, round_start[i]) for i, up in replies.ok.items()}
        check_trained(self.cfg, r, trained)
        for i, up in sorted(replies.ok.items()):
            self.traffic.up({i: self.traffic.update_bytes(up.adapter)})
            self.adapters[i] = up.adapter
            m = up.report
            self.files.log(
                TrainRecord(
                    round=r,
                    client=i,
                    step=self.step_at_end(r),
                    loss=m.loss,
                    last_loss=m.last_loss,
                    lr=m.lr,
                    tokens_per_s=m.tokens_per_s,
                )
            )
        return round_start

    def gather_evidence(
        self, r: int, members: list[int], advance: Advance, expected: int
    ) -> tuple[list[int], TrustEvidence]:
        """What the strategy needs about `members`, from those still in the round; returns them and it.
        `advance` counts the clients' answers, one per client and exchange (`CLIENT_EVIDENCE`); of the
        `expected` clients (the phase's count), those left out (screened, gone) are counted at once."""
        s = self.cfg.strategy
        need = s.spec.evidence
        sent = [i for i in members if i in self.members.active()]
        if expected > len(sent):
            advance((expected - len(sent)) * len(need & CLIENT_EVIDENCE))

        def done(i: int) -> None:
            advance(note=client_name(i))

        rows: dict[int, tuple[float, ...]] | None = None
        predictions: dict[int, Prediction] | None = None
        if "perplexity" in need:  # every client receives every peer's adapter
            # the uploads, forwarded as the codec's receivers decode them (as they are without compression)
            peers = dict(zip(sent, self.replied([self.adapters[i] for i in sent]), strict=True))
            self.traffic.down({i: sum(self.traffic.adapter_bytes(a) for a in peers.values()) for i in sent})
            replies = self.clients.evaluate_peers(r, peers, s.val_batches, done)
            self.members.note_failures(r, "evidence", replies)
            rows = {i: scores.ppl for i, scores in replies.ok.items()}
        if "prediction_distance" in need:
            bs = self.cfg.train.eval_batch_size
            got = self.clients.predict(r, self.send(sent), s.public_batches, bs, s.logits_topk, done)
            self.members.note_failures(r, "evidence", got)
            predictions = got.ok
            self.traffic.up({i: sum(v.nbytes + k.nbytes for v, k in p.topk) for i, p in predictions.items()})
        members = [i for i in sent if i in self.members.active()]
        ev = TrustEvidence(n_clients=len(members))
        if "adapters" in need:
            ev.adapters = [self.adapters[i] for i in members]
        if rows is not None:
            column = {j: c for c, j in enumerate(sent)}
            ev.perplexity = torch.tensor(
                [[rows[i][column[j]] for j in members] for i in members], dtype=torch.float32
            )
        if predictions is not None:
            ev.prediction_distance = prediction_distance([predictions[i] for i in members], s.logits_topk)
        if "mixtures" in need:
            ev.mixtures = label_mixtures([self.members.joined[i] for i in members])
        return members, ev

    def mix(self, r: int, round_start: list[AdapterState], advance: Advance) -> None:
        """Screen the uploads, mix the accepted ones; the others keep their round-start adapter."""
        answered = self.members.active()
        uploads = [self.adapters[i] for i in answered]
        for i in answered:  # a rejected update is discarded: start from the round's adapter
            self.adapters[i] = round_start[i]

        def evidence(accepted: list[int], adapters: list[AdapterState]) -> tuple[list[int], TrustEvidence]:
            for i, state in zip(accepted, adapters, strict=True):  # evidence is taken on what was uploaded
                self.adapters[i] = state
            return self.gather_evidence(r, accepted, advance, len(answered))

        mixed = self.pipeline.personalized(
            r, self.n, answered, uploads, [round_start[i] for i in answered], evidence
        )
        replies = self.replied(mixed.adapters)  # the server's reply leaves it encoded (federation.compress)
        for i, state in zip(mixed.members, replies, strict=True):
            self.adapters[i] = state
        for i in set(answered) - set(mixed.members):  # its upload (lost during the evidence) outlives the
            kept = copied(self.adapters[i])  # exchange it came from: keep a copy (Clients.train)
            self.adapters[i] = kept if self.adapters[i] is round_start[i] else self.replied([kept])[0]
        if self.merging:
            self.merge(r, replies[0] if mixed.members else None)
        full = torch.eye(self.n)  # clients left out keep their own adapter: identity rows
        if mixed.members:
            idx = torch.tensor(mixed.members)
            full[idx.unsqueeze(1), idx.unsqueeze(0)] = mixed.trust.to(full.dtype)
        self.files.log(
            TrustRecord(
                round=r,
                step=self.step_at_end(r),
                strategy=self.cfg.strategy.name,
                aggregator=self.cfg.robustness.aggregator,
                matrix=[[round(float(x), 6) for x in row] for row in full],
                participants=mixed.members,
            )
        )

    def merge(self, r: int, update: AdapterState | None) -> None:
        """The round's aggregate joins the history merged into every client's base weights, as the row's
        `merge` says. "update" (FLoRA): all of it, and every client starts the next round from a fresh
        LoRA (drawn from the run seed and round). "residual" (FedEx-LoRA): all but its last lora.r
        components, which every client keeps as its adapter."""
        rule, own = self.cfg.strategy.spec.merge, None
        if update is not None and rule == "residual":
            total = rank_of(update)
            cut = total - self.cfg.lora.rank_of(0)
            update, own = rank_slice(update, 0, cut), rank_slice(update, cut, total)
        if update is not None:
            self.base = update if self.base is None else flora_stack([self.base, update])
            self.clients.set_base(self.base)
            # every client's base takes it, so each is counted once for it, in the round it is made (on
            # Flower a client not asked this round gets it with its next message)
            self.traffic.down({i: self.traffic.adapter_bytes(update) for i in range(self.n)})
        if own is not None:  # kept as the clients decode it (sent again, encoded, it arrives the same)
            self.adapters = self.replied([own]) * self.n
        elif rule == "update":
            fresh = wide_initialisation(
                self.adapters[0], self.cfg.lora.max_rank, torch_generator("flora", self.cfg.run.seed, r)
            )
            self.adapters = self.replied(
                [resize_rank(fresh, self.cfg.lora.rank_of(i)) for i in range(self.n)]
            )

    def evaluate_clients(
        self, r: int, clients: list[int], logged: Set[tuple[int, str]], on_done: OnDone | None = None
    ) -> None:
        """Each of `clients`' validation (and test) loss and perplexity, logged unless in `logged` (a
        resumed round's, by client and split); with generation data, its test generations' scores."""
        replies = self.clients.evaluate(r, self.send(clients), on_done)
        self.members.note_failures(r, "evaluate", replies)
        generated = self.generated(r)
        for i, report in sorted(replies.ok.items()):
            splits: tuple[tuple[Literal["val", "test"], LMEval | None], ...] = (
                ("val", report.val),
                ("test", report.test),
            )
            for split, scores in splits:
                if scores is not None and (i, split) not in logged:
                    self.files.log(self.eval_record(r, i, split, scores))
            if report.gen is not None and i not in generated:
                self.log_samples(r, i, report.gen)
                self.files.log(self.gen_record(r, i, report.gen))

    def generated(self, r: int) -> set[int]:
        """The clients whose test generations round r has logged (a resumed round's)."""
        return {g.client for g in self.files.logged(GenRecord, r) if g.client is not None}

    def log_samples(self, r: int, client: int, scores: GenScores) -> None:
        """The few examples a client sent with its generations, at the final round, only when this
        server's config says the data is the shipped public data (data.shows_samples; a client sends
        none otherwise). Logged before the client's GenRecord, so a resumed round that finds the scores
        finds the samples too."""
        if r != self.rounds or not self.cfg.data.shows_samples:
            return
        for sample in scores.samples[:SAMPLES]:
            self.files.log(
                GenSampleRecord(
                    round=r,
                    step=self.step_at_end(r),
                    client=client,
                    split="test",
                    example=sample.example,
                    prompt=cut(sample.prompt, SAMPLE_PROMPT_CHARS),
                    reference=cut(sample.reference, SAMPLE_TEXT_CHARS),
                    generated=cut(sample.generated, SAMPLE_TEXT_CHARS),
                )
            )

    def gen_record(self, r: int, client: int, scores: GenScores) -> GenRecord:
        """A client's test generations judged (its own adapter: `model` None), scores only."""
        return GenRecord.of(scores, round=r, step=self.step_at_end(r), client=client, split="test")

    def eval_record(self, r: int, client: int, split: Split, scores: LMEval) -> EvalRecord:
        return EvalRecord(
            round=r,
            step=self.step_at_end(r),
            client=client,
            split=split,
            loss=scores.loss,
            ppl=scores.ppl,
            acc=scores.acc,
            tokens=scores.tokens,
        )

    # ---- traffic --------------------------------------------------------------------------------------
    def replied(self, adapters: Sequence[AdapterState]) -> list[AdapterState]:
        """Adapters as the clients decode them from the server's reply (`federation.compress`; off: as
        they are). The loop keeps these, so every later message of an adapter (training, evaluation,
        peers) carries the same values; adapters shared by several clients (one trust row) stay shared."""
        if self.compression.off:
            return list(adapters)
        done: dict[int, AdapterState] = {}
        for a in adapters:
            if id(a) not in done:
                done[id(a)] = roundtrip_state(a, self.compression)
        return [done[id(a)] for a in adapters]

    def send(self, clients: list[int]) -> dict[int, AdapterState]:
        """Each client's own adapter, as a message to it (counted in this round's traffic), as the client
        decodes it (the same values again for a reply the loop keeps decoded; an upload, re-encoded)."""
        self.traffic.down({i: self.traffic.adapter_bytes(self.adapters[i]) for i in clients})
        return dict(zip(clients, self.replied([self.adapters[i] for i in clients]), strict=True))

    # ---- state ----------------------------------------------------------------------------------------
    def checkpoint(self, r: int, scaffold: Mapping[str, Any]) -> None:
        saved = [self.as_saved(state) for state in self.adapters]
        writers = {
            client_name(i): (lambda d, s=state: self.save_adapter(s, d)) for i, state in enumerate(saved)
        }
        state = {
            "step": self.step_at_end(r),
            "clients": self.clients.state_dict(),
            # the round's traffic so far: a round resumed during its evaluation logs it whole
            "traffic": self.traffic.state_dict(),
            **scaffold,
        }
        self.files.checkpoint(r, writers, state)

    def as_saved(self, adapter: AdapterState) -> AdapterState:
        """What a client's model is, as one PEFT adapter: with a merged history (FLoRA), the history
        stacked before the client's own LoRA, so the saved adapter on the original base is that model."""
        return adapter if self.base is None else flora_stack([self.base, adapter])

    def restore(self) -> tuple[int, Mapping[str, Any]]:
        spec = AdapterSpec.of(self.adapters[0])  # before the restore: the pool's own initialisation
        r, path, state = self.files.resume({client_name(i): spec for i in range(self.n)})
        device = self.adapters[0][next(iter(self.adapters[0]))].device
        saved = [
            {k: v.to(device) for k, v in load_adapter(path / client_name(i)).items()} for i in range(self.n)
        ]
        merged = rank_of(saved[0]) - self.cfg.lora.rank_of(0) if self.merging else 0
        self.base = rank_slice(saved[0], 0, merged) if merged else None
        self.adapters = [rank_slice(s, merged, rank_of(s)) if merged else s for s in saved]
        if self.base is not None:
            self.clients.set_base(self.base)
        self.clients.load_state_dict(state["clients"])
        self.traffic.load_state_dict(state.get("traffic", {}))
        return r, state
