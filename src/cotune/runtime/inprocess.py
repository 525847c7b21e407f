"""The in-process transport: simulated clients in this process, one `ClientWork` each.

All clients' adapters are slots of one AdapterPool on one frozen base model, so N clients cost N
adapters + optimizer states, not N models. Simulation features live here because they are about
simulated clients: injected faults and `federation.client_timeout` (`guard.run_client`) and
malicious uploads (`simulation.attack`).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from cotune.config.schema import ExperimentConfig
from cotune.runtime import guard, simulated
from cotune.runtime.client import ClientWork, train_works_together
from cotune.runtime.port import (
    ClientInfo,
    EvalReport,
    OnDone,
    OnStep,
    PeerScores,
    Prediction,
    Replies,
    TrainReplies,
    TrainReport,
    Upload,
)
from cotune.state import AdapterState, copied


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def release_freed_memory() -> None:
    """Give the heap memory freed by a client's steps (activations, gradients, optimizer temporaries) back
    to the OS. glibc keeps it otherwise, and every further client's persistent state (AdamW moments) lands
    beyond it, so N simulated clients pinned N steps' worth of freed heap: bench/memory_scaling.py."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class InProcessClients:
    """The clients port over `ClientWork` objects that share one base model."""

    def __init__(self, cfg: ExperimentConfig, works: Sequence[ClientWork]) -> None:
        self.cfg, self.works = cfg, list(works)

    @property
    def n(self) -> int:
        return len(self.works)

    def describe(self) -> Replies[ClientInfo]:
        """Each client's description; a simulated `inflated_claim` attacker claims 10^9 examples."""
        return Replies(
            ok={
                w.index: replace(w.describe(), examples=simulated.CLAIM)
                if simulated.claims_inflated(self.cfg, w.index)
                else w.describe()
                for w in self.works
            }
        )

    def train(
        self,
        round_: int,
        adapters: Mapping[int, AdapterState],
        steps: int | None,
        on_step: OnStep | None = None,
        secure_weights: Mapping[int, float] | None = None,
    ) -> TrainReplies:
        """Each client trains in turn (or `federation.parallel_clients` at a time, in shared steps); a
        fault or timeout drops it, an attacker's upload is replaced.

        Secure aggregation has nothing to hide in one process: the uploads are returned in clear and
        the loop computes the same weighted mean.
        """
        replies = TrainReplies()
        order, size = list(adapters), self.cfg.federation.parallel_clients
        for start in range(0, len(order), size):
            group = order[start : start + size]
            outcomes = self.train_group(round_, group, adapters, steps, on_step)
            release_freed_memory()
            for i, outcome in outcomes.items():
                if not outcome.ok:
                    replies.failed[i] = outcome.reason or "failed"
                    continue
                upload, sent = self.works[i].upload(), adapters[i]
                upload = simulated.uploaded(self.cfg, round_, i, upload, sent)  # or a simulated attacker's
                replies.ok[i] = Upload(upload, outcome.value)
        return replies

    def train_group(
        self,
        round_: int,
        group: Sequence[int],
        adapters: Mapping[int, AdapterState],
        steps: int | None,
        on_step: OnStep | None,
    ) -> dict[int, guard.ClientOutcome]:
        """Clients `group` start from what they were sent and train: alone, or together in shared steps."""
        works = [self.works[i] for i in group]

        def shown(i: int) -> Callable[[float], None] | None:
            return None if on_step is None else (lambda loss: on_step(i, loss))

        def adopt_all() -> None:
            for work, i in zip(works, group, strict=True):
                work.adopt(adapters[i])

        if len(group) == 1:
            (i,) = group

            def alone() -> TrainReport:
                adopt_all()
                return works[0].train(steps, shown(i))

            return {i: guard.run_client(self.cfg, round_, i, alone)}

        def together() -> list[TrainReport]:
            adopt_all()
            return train_works_together(works, steps, [shown(i) for i in group])

        return guard.run_clients_together(group, together)

    def evaluate(
        self, round_: int, adapters: Mapping[int, AdapterState], on_done: OnDone | None = None
    ) -> Replies[EvalReport]:
        replies: Replies[EvalReport] = Replies()
        for i, state in adapters.items():
            self.works[i].adopt(state)
            replies.ok[i] = self.works[i].evaluate()
            if on_done is not None:
                on_done(i)
        return replies

    def evaluate_peers(
        self,
        round_: int,
        adapters: Mapping[int, AdapterState],
        val_batches: int,
        on_done: OnDone | None = None,
    ) -> Replies[PeerScores]:
        """Each client scores every peer on its validation windows. With `federation.parallel_clients`
        K > 1, each peer stays in its own slot and a client scores K of them per forward (one
        mixed-adapter batch); otherwise each peer in turn in the client's own slot, as a SuperNode does."""
        together = self.cfg.federation.parallel_clients
        if together > 1:
            for j, state in adapters.items():  # usually there already: an upload is its slot
                self.works[j].adopt(state)
            slots = [self.works[j].learner.slot for j in adapters]

            def row(i: int) -> PeerScores:
                return self.works[i].peer_perplexity_in_slots(slots, val_batches, together)

        else:
            # copies: a peer's adapter may be a client's upload, which lives in the slot each client's
            # scoring overwrites (see Clients.train)
            peers = [copied(a) for a in adapters.values()]

            def row(i: int) -> PeerScores:
                return self.works[i].peer_perplexity(peers, val_batches)

        replies: Replies[PeerScores] = Replies()
        for i in adapters:
            replies.ok[i] = row(i)
            if on_done is not None:
                on_done(i)
        return replies

    def predict(
        self,
        round_: int,
        adapters: Mapping[int, AdapterState],
        batches: int,
        batch_size: int,
        k: int,
        on_done: OnDone | None = None,
    ) -> Replies[Prediction]:
        replies: Replies[Prediction] = Replies()
        for i, state in adapters.items():
            self.works[i].adopt(state)
            replies.ok[i] = self.works[i].predict(batches, batch_size, k, round_)
            if on_done is not None:
                on_done(i)
        return replies

    def set_base(self, update: AdapterState | None) -> None:
        """The clients share one base: merged once for all of them."""
        for pool in {id(w.pool): w.pool for w in self.works}.values():
            pool.set_base_update(update)

    def state_dict(self) -> list[dict[str, Any]]:
        return [w.state_dict() for w in self.works]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        for w, s in zip(self.works, state, strict=True):
            w.load_state_dict(s)
