"""Which clients take part: those that joined the federation, less those dropped from the round.

Both round loops keep their membership here, so a client that fails (raises, times out, sends a
refused upload) is logged, dropped from the round in progress and asked again next round the same
way in every family, and too few answers stop the run before anything of the round is checkpointed.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from cotune.config.schema import ExperimentConfig
from cotune.runtime import guard
from cotune.runtime.port import Replies


class Membership:
    """The joined clients (with their descriptions) and the ones dropped from the current round."""

    def __init__(self, cfg: ExperimentConfig, log: guard.Log, console: Console) -> None:
        self.cfg, self.log, self.console = cfg, log, console
        self.n = cfg.federation.clients
        self.joined: dict[int, dict[str, Any]] = {}  # client -> its description, for those that answered
        self.dropped: set[int] = set()  # clients dropped from the round in progress

    def join(self, replies: Replies[dict[str, Any]]) -> None:
        """Admit the clients that described themselves; the others are dropped from round 0."""
        self.joined = dict(sorted(replies.ok.items()))
        self.note_failures(0, "connect", replies)

    def start_round(self) -> None:
        """Every joined client is asked again at the start of a round, dropped ones included."""
        self.dropped = set()

    def active(self) -> list[int]:
        """The clients in the round in progress: joined and not dropped from it."""
        return [i for i in self.joined if i not in self.dropped]

    def note_failures(self, r: int, phase: str, replies: Replies[Any]) -> None:
        """Log every client that gave no answer, drop it from this round, stop if too few are left."""
        for i, reason in sorted(replies.failed.items()):
            self.dropped.add(i)
            guard.log_dropped(self.log, r, i, reason, phase)
            self.console.print(f"[yellow]client {i} dropped from round {r} ({phase}):[/] {reason}")
        guard.require(self.cfg, self.log, r, len(self.active()), self.n, "answered")
