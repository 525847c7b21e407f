"""Live progress: bars on a terminal, plain timed lines in logs, a heartbeat through long silent work."""

from __future__ import annotations

import io
import time

from rich.console import Console

from cotune.reporting.progress import Activity


def _plain() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_log_lines_count_and_estimate_and_close_the_phase():
    console, out = _plain()
    activity = Activity(console, every=0.05)
    assert not activity.live
    with activity.phase("round 1/2 · training", 4) as advance:
        for k in range(4):
            time.sleep(0.06)
            advance(note=f"client-{k:02d} loss 1.000")
    lines = out.getvalue().splitlines()
    counted = [x for x in lines if "ETA" in x]  # once a step is done, its pace gives an estimate
    assert counted and all(x.startswith("round 1/2 · training: ") for x in counted)
    assert any(x.endswith("client-00 loss 1.000") or x.endswith("client-01 loss 1.000") for x in counted)
    assert lines[-1].startswith("round 1/2 · training: 4/4") and lines[-1].endswith("· done")


def test_a_long_silent_step_still_prints_heartbeats():
    console, out = _plain()
    with Activity(console, every=0.05).phase("round 3/3 · evaluation on the test split"):
        time.sleep(0.3)  # one long forward pass: no advance at all
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and all(x.startswith("round 3/3 · evaluation on the test split: 0") for x in lines)


def test_a_short_phase_prints_nothing_in_logs():
    console, out = _plain()
    with Activity(console, every=10.0).phase("quick", 2) as advance:
        advance()
        advance()
    assert out.getvalue() == ""


def test_a_terminal_gets_a_transient_bar():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    activity = Activity(console)
    assert activity.live
    with activity.phase("round 1/1 · training", 2) as advance:
        advance(note="client-00 loss 2.000")
        advance(note="client-01 loss 1.000")
    assert "round 1/1 · training" in out.getvalue()
