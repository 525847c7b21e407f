"""Live progress of a run's phases (training, peer evaluation, distillation, evaluation).

On a terminal each phase is a rich progress bar with its count, elapsed time and ETA; when the output
is a file or a pipe (CI logs, `nohup`, a scheduler), the same phase is plain lines: one at most every
`every` seconds while it runs and one when it ends, so a long round is never silent. A phase with no
known total shows its count only. Nothing here names data: descriptions are round numbers, client
names and losses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Advance = Callable[..., None]  # advance(n: int = 1, note: str = "")
EVERY = 10.0  # seconds between two plain lines of one phase (and the shortest phase that gets a closing line)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Activity:
    """The run's live progress: `phase(description, total)` yields `advance(n=1, note="")`."""

    def __init__(self, console: Console, every: float | None = None, live: bool | None = None) -> None:
        self.console, self.every = console, EVERY if every is None else every
        self.live = console.is_terminal if live is None else live

    @contextmanager
    def phase(self, description: str, total: int | None = None) -> Iterator[Advance]:
        if self.live:
            with self._bar(description, total) as advance:
                yield advance
        else:
            with self._lines(description, total) as advance:
                yield advance

    @contextmanager
    def _bar(self, description: str, total: int | None) -> Iterator[Advance]:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        if total is not None:
            columns.append(TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task(description, total=total)

            def advance(n: int = 1, note: str = "") -> None:
                shown = f"{description} · {note}" if note else description
                progress.update(task, advance=n, description=shown)

            yield advance

    @contextmanager
    def _lines(self, description: str, total: int | None) -> Iterator[Advance]:
        """Plain lines: on every `advance` once `every` seconds have passed, and from a heartbeat thread
        when no advance comes for that long (one evaluation pass of a large model can take minutes)."""
        start = last = time.perf_counter()
        done, latest = 0, ""
        lock, stop = threading.Lock(), threading.Event()

        def line(now: float) -> str:
            count = f"{done}/{total}" if total is not None else f"{done}"
            text = f"{description}: {count} · {_clock(now - start)}"
            if total and done:
                text += f", ETA {_clock((now - start) / done * (total - done))}"
            return f"{text} · {latest}" if latest else text

        def show_if_due() -> None:
            nonlocal last
            with lock:
                now = time.perf_counter()
                if now - last >= self.every:
                    self.console.print(line(now), highlight=False)
                    last = now

        def advance(n: int = 1, note: str = "") -> None:
            nonlocal done, latest
            with lock:
                done += n
                latest = note or latest
            show_if_due()

        def heartbeat() -> None:
            while not stop.wait(max(self.every / 4, 0.01)):
                show_if_due()

        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        try:
            yield advance
        finally:
            stop.set()
            beat.join()
        if time.perf_counter() - start >= self.every:  # a short phase needs no closing line
            self.console.print(line(time.perf_counter()) + " · done", highlight=False)
