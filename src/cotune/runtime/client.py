"""What ONE client does, whatever carries its messages: train, evaluate, rate peers, predict.

`InProcessClients` holds one `ClientWork` per simulated client (all on one shared base model); a
Flower SuperNode's ClientApp builds one for its data owner. Both call the same methods, so a client
computes the same thing in a simulation and in a deployment.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

from cotune.algorithms.compression import Compression, Encoded, applied, compress_update
from cotune.algorithms.privacy import EvidenceProtection
from cotune.algorithms.ranks import rank_of
from cotune.algorithms.robust import update_delta
from cotune.data.windows import Rows
from cotune.evaluation.generation import Decode, GenRequest, evaluate_generation, gen_samples
from cotune.evaluation.lm import IGNORE_INDEX, evaluate_lm, evaluate_lm_through, rows_batch
from cotune.runtime.port import ClientInfo, EvalReport, GenScores, PeerScores, Prediction, TrainReport
from cotune.state import AdapterState, copied, state_digest
from cotune.training.learner import Learner, StepLog
from cotune.training.together import train_together


def windows_hash(windows: Rows) -> str:
    """Identifies a set of token windows (or examples: their tokens and which positions are scored), so
    the server can check every client has the same public set and compares the same positions."""
    parts = [windows] if isinstance(windows, torch.Tensor) else [windows.input_ids, windows.labels]
    h = hashlib.sha256(str(tuple(parts[0].shape)).encode())
    for t in parts:
        h.update(t.to(torch.int64).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def top_values(
    logits: torch.Tensor, k: int, support: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices): the top-k of `logits`; with `support` (other logits of the same positions: the
    base model's, for protected evidence), `logits` at the top-k tokens of `support`, so which tokens are
    sent does not depend on the client's adapter."""
    if support is None:
        return logits.topk(k, dim=-1)
    indices = support.topk(k, dim=-1).indices
    return logits.gather(-1, indices), indices


def responses_first(x: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """x (B, T, k) with each row's scored positions moved to the front in their order, (B, R, k), R the
    most any row has; a row with fewer is filled with zeros."""
    width = int(scored.sum(1).max()) if scored.numel() else 0
    order = torch.argsort((~scored).to(torch.int8), dim=1, stable=True)[:, :width]
    keep = torch.gather(scored, 1, order).unsqueeze(-1)
    at = order.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return torch.gather(x, 1, at) * keep


def response_topk(
    logits: torch.Tensor, scored: torch.Tensor, k: int, support: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices), each (B, R, k): the top-k logits of each row's scored (response) positions
    (`top_values`, on `support`'s top-k where given), moved to the front of the row (`responses_first`);
    a row with fewer is filled with zero values at index 0, which add nothing to a prediction distance
    (both clients' are equal and carry no mass), so the distance per public example is that of the
    response positions alone."""
    values, indices = top_values(logits, k, support)
    return responses_first(values, scored), responses_first(indices, scored)


def public_logits(
    model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], responses: bool
) -> torch.Tensor:
    """float32 logits of a public batch: at every position of token windows; of generation examples
    (`responses`), those that predict a next token (the last predicts none)."""
    logits = model(**inputs).logits
    return (logits[:, :-1] if responses else logits).float()


def release_batches(public: Rows, batches: int, batch_size: int) -> list[torch.Tensor]:
    """The rows of the first `batches` public batches, batch by batch: what prediction trust is sent on."""
    n = min(batches, math.ceil(len(public) / batch_size))
    return [torch.arange(b * batch_size, min((b + 1) * batch_size, len(public))) for b in range(n)]


@torch.no_grad()
def release_topk(
    model: torch.nn.Module,
    public: Rows,
    batches: Sequence[torch.Tensor],
    k: int,
    device: torch.device,
    protection: EvidenceProtection | None = None,
    at: tuple[object, ...] = (),
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """What a client uploads for prediction trust with `model`'s active adapter on `public`'s rows
    `batches`: each batch's top-k (values, indices) on the CPU, and the vocabulary size. At every
    position of token windows; of generation examples, only where a response token is predicted
    (`response_topk`), so the prompts, which every client is given alike, are not compared. With
    `protection`, on the base model's top-k tokens, clipped and noised as one release
    (`EvidenceProtection.protect`, its noise the instance `at` of the `privacy` stream)."""
    out, vocab = [], 0
    for rows in batches:
        inputs, target = rows_batch(public, rows, device)
        scored = None if isinstance(public, torch.Tensor) else target != IGNORE_INDEX
        logits = public_logits(model, inputs, scored is not None)
        base = None
        if protection is not None:
            with model.disable_adapter():  # type: ignore[operator]
                base = public_logits(model, inputs, scored is not None)
        vocab = logits.shape[-1]
        if scored is None:
            values, indices = top_values(logits, min(k, vocab), base)
        else:
            values, indices = response_topk(logits, scored, min(k, vocab), base)
        out.append((values.cpu(), indices.cpu()))
    if protection is not None:
        protected = protection.protect([v for v, _ in out], at)
        out = [(v, i) for v, (_, i) in zip(protected, out, strict=True)]
    return out, vocab


def release_targets(public: Rows, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each released position's true next token (IGNORE_INDEX where none: a window's last position, a
    filler of `response_topk`), laid out as `release_topk`'s values: what an attacker who knows the
    public rows compares a release with (the privacy audit of the evidence)."""
    out = []
    for rows in batches:
        target = rows_batch(public, rows, torch.device("cpu"))[1]
        if isinstance(public, torch.Tensor):
            out.append(F.pad(target, (0, 1), value=IGNORE_INDEX))
            continue
        scored = target != IGNORE_INDEX
        first = responses_first(torch.stack([target, scored.long()], -1), scored)
        out.append(torch.where(first[..., 1] > 0, first[..., 0], IGNORE_INDEX))
    return out


@dataclass(frozen=True)
class Decoding:
    """How a client decodes its test prompts (generation data): the ids that stop a response, the id
    that pads a prompt, the tokenizer's decode, and the budget of new tokens; `samples`, how many test
    examples it sends back with their generations (0 unless its data is the shipped public data:
    `setup.decoding_of`)."""

    stop_ids: tuple[int, ...]
    pad_id: int
    decode: Decode
    max_new_tokens: int
    samples: int = 0


# Evaluations kept across the variants of one embedded comparison (`run.compare`): they share the base
# model and the data split, and every variant starts from the same adapters, so their round-0
# evaluations are one evaluation (a quarter of a generation sweep's work, decoding included).
EvalMemo = dict[tuple[int, str, int], EvalReport]


class ClientWork:
    """One client: its Learner (adapter slot, optimizer, schedule, data cursor) and its other data.

    `val` (token windows, or generation examples scored on their responses) is what `evaluate` and
    `evaluate_peers` score, `test` what `evaluate` also reports and nothing else reads (the trust never
    sees it); generation data adds `requests` (the test examples as prompts) that `evaluate` decodes with
    `decoding` and scores, the texts never leaving the client (but for `decoding.samples` examples of
    shipped public data); `public` gives the shared
    reference set for prediction trust when asked (built lazily: only that strategy needs it);
    `budget` is the client's own steps per round where it decides them (FedCoLLM's local_epochs
    depend on its data); `info` is its description for the server (`setup.client_info`); `memo`, where
    given, keeps its evaluations by adapter weights (`EvalMemo`); `compression`, where on
    (`federation.compress`), how its round update leaves it (`upload`), the error-feedback residual it
    keeps being part of its trainer state; `evidence`, where on (`privacy.evidence_clip`), how it
    protects the top-k logits it uploads (`predict`).
    """

    def __init__(
        self,
        index: int,
        learner: Learner,
        *,
        val: Rows | None = None,
        test: Rows | None = None,
        public: Callable[[], Rows] | None = None,
        eval_batch_size: int = 8,
        budget: int | None = None,
        info: ClientInfo,
        requests: Sequence[GenRequest] = (),
        decoding: Decoding | None = None,
        memo: EvalMemo | None = None,
        compression: Compression | None = None,
        evidence: EvidenceProtection | None = None,
    ) -> None:
        self.index, self.learner, self.val, self.test = index, learner, val, test
        self.memo = memo
        self.compression = compression if compression is not None and not compression.off else None
        self.residual: AdapterState | None = None  # what the encoding dropped of its updates so far
        self.start: AdapterState | None = None  # its adapter as the round's training began (as sent)
        self.encoded: AdapterState | None = None  # the round's upload as the server decodes it
        self.payload: dict[str, Encoded] | None = None  # the round's update as it travels
        self.requests, self.decoding = list(requests), decoding
        self._public = public
        self.eval_batch_size, self.budget = eval_batch_size, budget
        self.info = info
        self.evidence = evidence

    @property
    def pool(self):  # the AdapterPool holding this client's slot
        return self.learner.pool

    @cached_property
    def public(self) -> Rows:
        windows = self._public() if self._public is not None else None
        if windows is None or len(windows) == 0:
            raise ValueError("prediction trust needs a public reference set: set data.public_windows > 0")
        return windows

    # ---- the adapter ------------------------------------------------------------------------------
    def adapter(self) -> AdapterState:
        return self.pool.state(self.learner.slot)

    def upload(self) -> AdapterState:
        """Its adapter as it is now, not copied (N simulated clients hold no second copy of their uploads):
        valid until this client's slot is written again, by its next exchange. With compression, what
        the server decodes of the round's update: the adapter it was sent + the decoded update."""
        if self.encoded is not None:
            return self.encoded
        return self.pool.view(self.learner.slot)

    # ---- the round's update on the wire (federation.compress) -----------------------------------------
    def begin_update(self) -> None:
        """Before its local steps: what it was sent, the reference its update is taken from."""
        if self.compression is not None:
            self.start, self.encoded, self.payload = copied(self.adapter()), None, None

    def finish_update(self) -> None:
        """After its local steps, the one place an update leaves a client: encoded (with the residual of
        its earlier rounds under error feedback), and what the server will decode of it kept as the
        upload; the new residual stays here."""
        spec, start = self.compression, self.start
        if spec is None or start is None:
            return
        sent = compress_update(update_delta(self.adapter(), start), self.residual, spec)
        self.residual, self.payload = sent.residual, sent.payload
        self.encoded = applied(start, sent.decoded)
        self.start = None

    def adopt(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load `state` in place (the optimizer keeps pointing at the same parameters)."""
        device = self.learner.device
        self.pool.load_state(self.learner.slot, {k: v.to(device) for k, v in state.items()})

    # ---- the work ---------------------------------------------------------------------------------
    def train(self, steps: int | None = None, on_step: Callable[[float], None] | None = None) -> TrainReport:
        """Local steps on its own data (`steps`, else its own budget); the round's training metrics."""
        n = self.steps(steps)
        self.begin_update()
        log = self.learner.train(n, on_step)
        self.finish_update()
        return self.train_report(log, n)

    def steps(self, steps: int | None) -> int:
        """The round's `steps`, else the client's own budget."""
        n = self.budget if steps is None else steps
        if n is None:
            raise ValueError("this client has no step budget of its own: the round must give `steps`")
        return n

    def train_report(self, log: StepLog, n: int) -> TrainReport:
        """What a client reports of its round's training."""
        return TrainReport(
            loss=log.mean_loss,
            last_loss=log.losses[-1] if log.losses else float("nan"),
            lr=self.learner.lr,
            tokens_per_s=log.tokens / log.seconds if log.seconds else 0.0,
            steps=n,
            wall_s=log.seconds,
        )

    def evaluate(self) -> EvalReport:
        """Loss, perplexity and next-token accuracy of its adapter on its validation windows, and on its
        test windows when it has some (generation data: of the response tokens); and, with generation
        data, the scores of what it generates for its test prompts. An adapter the memo holds scores
        for is not scored again."""
        key = self.memo_key()
        if key is not None and self.memo is not None and key in self.memo:
            return self.memo[key]
        self.pool.activate(self.learner.slot)
        val = evaluate_lm(self.pool.model, self._val(), self.eval_batch_size)
        test = None
        if self.test is not None and len(self.test):
            test = evaluate_lm(self.pool.model, self.test, self.eval_batch_size)
        report = EvalReport(val, test, gen=self.generate(None if test is None else test.ppl))
        if key is not None and self.memo is not None:
            self.memo[key] = report
        return report

    def memo_key(self) -> tuple[int, str, int] | None:
        """Its evaluations' key in the memo: this client (its data), its adapter's weights, the batch
        size (padding changes the last bits). None, nothing kept: no memo, or a base carrying a merged
        update (FLoRA), which the adapter's weights do not show."""
        if self.memo is None or self.pool.original:
            return None
        return (self.index, state_digest(self.adapter()), self.eval_batch_size)

    def generate(self, reference_ppl: float | None = None) -> GenScores | None:
        """Its adapter's greedy generations for its test prompts, scored (None without generation data).
        The test split is already capped (data.max_test_windows), so every request is decoded.
        `reference_ppl`: the test split's perplexity `evaluate` has just scored on the rows encoded from
        these same requests (response tokens only), which the generation scores report as theirs rather
        than run every prompt and response through the model a second time."""
        if not self.requests or self.decoding is None:
            return None
        d = self.decoding
        self.pool.activate(self.learner.slot)
        scores = evaluate_generation(
            self.pool.model,
            self.requests,
            batch_size=self.eval_batch_size,
            max_new_tokens=d.max_new_tokens,
            stop_ids=d.stop_ids,
            pad_id=d.pad_id,
            decode=d.decode,
            reference_ppl=reference_ppl,
        )
        samples = tuple(gen_samples(self.requests, scores.predictions, d.samples)) if d.samples else ()
        return GenScores(scores.n, scores.exact_match, scores.f1, scores.rouge_l, scores.ppl, samples)

    def peer_perplexity(self, adapters: Sequence[Mapping[str, torch.Tensor]], val_batches: int) -> PeerScores:
        """Its row of P: the perplexity of each given adapter on its own validation windows."""
        own = self.adapter()
        rank = rank_of(own)
        row = []
        for state in adapters:
            if rank_of(state) == rank:
                self.pool.activate(self.learner.slot)
                self.adopt(state)
            else:  # a peer of another rank (lora.ranks) is scored in a spare adapter of its rank
                spare = self.pool.scratch(rank_of(state))
                self.pool.load_state(spare, {k: v.to(self.learner.device) for k, v in state.items()})
                self.pool.activate(spare)
            res = evaluate_lm(self.pool.model, self._val(), self.eval_batch_size, val_batches)
            row.append(res.ppl)
        self.pool.activate(self.learner.slot)
        self.adopt(own)
        return PeerScores(tuple(row))

    def peer_perplexity_in_slots(self, slots: Sequence[str], val_batches: int, together: int) -> PeerScores:
        """Its row of P from peer adapters already loaded in `slots` of its pool, scored `together` at a
        time in one mixed-adapter forward per batch (nothing of its own slot is overwritten)."""
        row: list[float] = []
        for start in range(0, len(slots), together):
            with self.pool.lanes_for(slots[start : start + together]) as lanes:
                scores = evaluate_lm_through(
                    self.pool.model, self._val(), self.eval_batch_size, lanes, val_batches
                )
            row += [res.ppl for res in scores]
        return PeerScores(tuple(row))

    @torch.no_grad()
    def predict(self, batches: int, batch_size: int, k: int, round_: int = 0) -> Prediction:
        """Top-k logits of its adapter on the first `batches` public batches (lean trust evidence,
        `release_topk`): protected, where `evidence` says so, before they leave the client."""
        public = self.public
        self.pool.activate(self.learner.slot)
        model = self.pool.model
        model.eval()
        device = torch.device(self.learner.device)
        rows = release_batches(public, batches, batch_size)
        at = (round_, ("evidence", self.index))  # its own noise in each round
        out, vocab = release_topk(model, public, rows, k, device, self.evidence, at)
        return Prediction(out, vocab, windows_hash(public))

    def describe(self) -> ClientInfo:
        return self.info

    # ---- trainer state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Its learner's state, and under error feedback the residual it has not sent yet."""
        state = self.learner.state_dict()
        if self.residual is not None:
            state[RESIDUAL] = {k: v.detach().cpu() for k, v in self.residual.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        residual = state.get(RESIDUAL)
        self.residual = (
            None if residual is None else {k: v.to(self.learner.device) for k, v in residual.items()}
        )
        self.learner.load_state_dict({k: v for k, v in state.items() if k != RESIDUAL})

    def _val(self) -> Rows:
        if self.val is None:
            raise ValueError("this client has no validation windows to evaluate on")
        return self.val


RESIDUAL = "compression_residual"  # the error-feedback residual's key in a client's trainer state


def train_works_together(
    works: Sequence[ClientWork], steps: int | None, on_step: Sequence[Callable[[float], None] | None]
) -> list[TrainReport]:
    """The local steps of several clients of one adapter pool as shared forward/backward passes
    (federation.parallel_clients): each ends as if it had trained alone; its metrics as `train`'s."""
    budgets = [work.steps(steps) for work in works]
    for work in works:
        work.begin_update()
    logs = train_together([work.learner for work in works], budgets, on_step)
    for work in works:
        work.finish_update()
    return [work.train_report(log, n) for work, log, n in zip(works, logs, budgets, strict=True)]
