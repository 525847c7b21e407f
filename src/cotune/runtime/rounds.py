"""The round scaffold: one order of phases and one resume rule for both round loops.

A family's loop (`PersonalizedLoop`, `FedCoLLMLoop`) says what each phase does (`RoundLoop`, its
hooks); `run_rounds` says when, the same for every family and transport:

    join → start: the start record, checkpoint 0, round 0's evaluation (before any training)
         | resume: the newest intact checkpoint restored, its round completed (below)
    → each round r: draw its participants → train → aggregate → checkpoint r
                    → evaluate (on evaluation rounds) → the round's closing records → console line
    → the end record

Why the checkpoint comes before the evaluation: training and aggregation are the round's costly
and random work, and its evaluation (FedCoLLM: every model on the whole test split; personalized:
every client's validation and test windows) can take as long, yet reads the round's adapters
without changing them, the trainer states or any random stream. Checkpointed first, a run stopped
during an evaluation loses only that evaluation, never the round's training.

The resume rule (both families): `RunFiles.resume` restores the newest intact checkpoint and drops
the metrics of later rounds. The restored round may have stopped during its evaluation; its round
record marks it complete. Without one, its evaluation runs again for what is not logged yet (each
family's `evaluate` skips the records already there, read as typed records with `RunFiles.logged`),
then its closing records. Round 0 (no round record) has its evaluation completed the same way.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from rich.console import Console

from cotune.records import RoundRecord, RunEvent
from cotune.runtime.membership import Membership
from cotune.runtime.rundir import RunFiles, main_name

T = TypeVar("T")


@dataclass(frozen=True)
class RoundTimes:
    """A round's clock: `train_s`, its work before the checkpoint (training and aggregation); `wall_s`,
    the whole round (after a resume: the stopped run's `train_s` plus what the resumed run did)."""

    train_s: float
    wall_s: float


class RoundLoop(Protocol[T]):
    """What a family's loop does in each phase of a round (`run_rounds` calls them in order). `T` is
    what its `train` hands to its `aggregate` (the round's uploads and whatever else they need)."""

    files: RunFiles
    members: Membership
    console: Console

    @property
    def rounds(self) -> int:
        """How many training rounds the run has (0: an algorithm that trains nothing)."""
        ...

    def join(self) -> None:
        """Admit the clients that answer (`members.join`) and take what the loop needs of them."""
        ...

    def client_names(self) -> list[str] | None:
        """Each client named by its data, for the start record (None: not named)."""
        ...

    def duplicates(self) -> dict[str, int] | None:
        """Duplicated documents / examples dropped before the split, for the start record (None: this
        process did not build the data, e.g. a Flower server of the personalized family)."""
        ...

    def train(self, r: int) -> T:
        """The clients' local training of round r (the participants drawn, `members.active()`)."""
        ...

    def aggregate(self, r: int, trained: T) -> None:
        """Everything of round r after the local training that changes an adapter (the server's work)."""
        ...

    def checkpoint(self, r: int, scaffold: Mapping[str, Any]) -> None:
        """Round r's checkpoint; its state holds `scaffold` (what `run_rounds` needs back on resume)."""
        ...

    def restore(self) -> tuple[int, Mapping[str, Any]]:
        """Load the newest intact checkpoint (`RunFiles.resume`): its round and its state."""
        ...

    def evaluate(self, r: int) -> None:
        """Round r's evaluation: score and log what is not in the metrics yet (after a resume, what a
        stopped run had not logged). The one place a family's evaluations are added."""
        ...

    def close_round(self, r: int, times: RoundTimes) -> tuple[RoundRecord, str]:
        """Log what the family logs after the evaluation; return the round record and the console line."""
        ...

    def end_event(self) -> RunEvent:
        """The run's end record."""
        ...


def run_rounds(loop: RoundLoop[T], resume: bool) -> None:
    """Join, start or resume, run every round left in the one order, end (the module docstring)."""
    loop.join()
    last = resumed(loop) if resume else started(loop)
    for r in range(last + 1, loop.rounds + 1):
        t0 = time.perf_counter()
        loop.members.start_round(r)
        loop.aggregate(r, loop.train(r))
        train_s = time.perf_counter() - t0
        loop.checkpoint(r, scaffold_state(loop.members, train_s))
        complete_round(loop, r, t0, train_s)
    loop.files.log(loop.end_event())


def started(loop: RoundLoop[T]) -> int:
    """A fresh run: the start record, checkpoint 0 (every adapter as initialised), round 0's evaluation."""
    files, cfg = loop.files, loop.files.cfg
    files.log(
        RunEvent(
            event="start",
            algorithm=cfg.algorithm,
            strategy=main_name(cfg),
            clients=cfg.federation.clients,
            backend=files.backend,
            client_names=loop.client_names(),
            duplicates=loop.duplicates(),
        )
    )
    loop.checkpoint(0, scaffold_state(loop.members, 0.0))
    complete_round(loop, 0, time.perf_counter(), 0.0)
    return 0


def resumed(loop: RoundLoop[T]) -> int:
    """A resumed run: the checkpoint restored, its round's membership back, the round completed."""
    last, state = loop.restore()
    members = loop.members
    members.resume_round(state.get("participants", members.active()), state.get("dropped", []))
    train_s = float(state.get("train_s", 0.0))  # checkpoints of older versions lack it
    complete_round(loop, last, time.perf_counter() - train_s, train_s)
    return last


def scaffold_state(members: Membership, train_s: float) -> dict[str, Any]:
    """What a checkpoint keeps for `resumed`: who trained in the round, who was dropped from it, and its
    training time (the round record of a round resumed during its evaluation)."""
    return {"participants": members.active(), "dropped": sorted(members.dropped), "train_s": train_s}


def complete_round(loop: RoundLoop[T], r: int, t0: float, train_s: float) -> None:
    """Round r's evaluation (on evaluation rounds; round 0 always) and closing records, unless its round
    record is logged already (a resumed round that had completed)."""
    files = loop.files
    if r > 0 and files.logged(RoundRecord, r):
        return
    if r == 0 or files.cfg.is_eval_round(r):
        loop.evaluate(r)
    if r == 0:
        return
    record, line = loop.close_round(r, RoundTimes(train_s, time.perf_counter() - t0))
    files.log(record)
    loop.console.print(line)
