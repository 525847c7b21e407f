"""Which clients take part: those that joined the federation, less those dropped from the round.

Both round loops keep their membership here, so a client that fails (raises, times out, sends a
refused upload) is logged, dropped from the round in progress and asked again next round the same
way in every family, and too few answers stop the run before anything of the round is checkpointed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console

from cotune.config.schema import ExperimentConfig
from cotune.runtime import quorum
from cotune.runtime.port import ClientInfo, Replies
from cotune.seeds import torch_generator


def participants(cfg: ExperimentConfig, r: int, joined: Sequence[int]) -> list[int]:
    """The clients drawn to train in round r: every joined one, or `federation.clients_per_round` of
    them drawn by a generator seeded from (run.seed, r), so a resumed run draws the same ones and
    the draw never touches the training's random streams."""
    m = cfg.federation.sampled_per_round
    if m >= len(joined):
        return list(joined)
    order = torch.randperm(len(joined), generator=torch_generator("participants", cfg.run.seed, r))
    return sorted(joined[int(i)] for i in order[:m])


class Membership:
    """The joined clients (with their descriptions), the ones drawn for the current round, and the
    ones dropped from it."""

    def __init__(self, cfg: ExperimentConfig, log: quorum.Log, console: Console) -> None:
        self.cfg, self.log, self.console = cfg, log, console
        self.n = cfg.federation.clients
        self.joined: dict[int, ClientInfo] = {}  # client -> its description, for those that answered
        self.drawn: list[int] = []  # clients drawn to train in the round in progress
        self.dropped: set[int] = set()  # clients dropped from the round in progress

    def join(self, replies: Replies[ClientInfo]) -> None:
        """Admit the clients that described themselves; the others are dropped from round 0."""
        self.joined = dict(sorted(replies.ok.items()))
        self.drawn = list(self.joined)
        self.note_failures(0, "connect", replies, expected=self.n)

    def start_round(self, r: int) -> None:
        """Draw round r's participants; every one is asked, those dropped last round included."""
        self.dropped = set()
        self.drawn = participants(self.cfg, r, list(self.joined))

    def resume_round(self, drawn: Sequence[int], dropped: Sequence[int]) -> None:
        """Continue a round from its checkpoint: the clients that trained in it and those dropped from it
        (a resumed round's evaluation covers whom the stopped run's would have)."""
        self.drawn = [i for i in drawn if i in self.joined]
        self.dropped = set(dropped)

    def active(self) -> list[int]:
        """The clients that train in the round in progress: drawn and not dropped from it."""
        return [i for i in self.drawn if i not in self.dropped]

    def present(self) -> list[int]:
        """Every joined client not dropped from the round (evaluation covers those not drawn too)."""
        return [i for i in self.joined if i not in self.dropped]

    @property
    def sample_rate(self) -> float:
        """q: each client's chance to take part in a round (what client-level DP accounting needs)."""
        return self.cfg.federation.sampled_per_round / self.n

    def note_failures(self, r: int, phase: str, replies: Replies[Any], expected: int | None = None) -> None:
        """Log every client that gave no answer, drop it from this round, stop if too few are left."""
        for i, reason in sorted(replies.failed.items()):
            self.dropped.add(i)
            quorum.log_dropped(self.log, r, i, reason, phase)
            self.console.print(f"[yellow]client {i} dropped from round {r} ({phase}):[/] {reason}")
        total = expected if expected is not None else len(self.drawn)
        quorum.require(self.cfg, self.log, r, len(self.active()), total, "answered")
