"""Live progress: bars on a terminal, plain timed lines in logs, a heartbeat through long silent work."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from tests.conftest import tiny_tree
from tests.test_cotuning import task_file  # noqa: F401  (a fixture)
from tests.test_cotuning import tree as cotuning_tree
from typer.testing import CliRunner

from cotune.cli.main import app
from cotune.reporting import progress
from cotune.reporting.metrics import read_metrics
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


# ---- the counts of real runs: every phase that ends, ends at its total ------------------------------------
PHASE_END = re.compile(r"^(round \S+ · [^:]+): (\d+)/(\d+) · .*· done$")


def _piped_run(tree_: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`cotune run` with its output piped, a line at every count (EVERY 0): the lines of the run."""
    monkeypatch.setattr(progress, "EVERY", 0.0)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(tree_))
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def _phase_ends(lines: list[str]) -> dict[str, tuple[int, int]]:
    """Each phase's closing line: (count, total) by its description."""
    return {m[1]: (int(m[2]), int(m[3])) for m in map(PHASE_END.match, lines) if m}


@pytest.mark.parametrize("strategy", ["validation", "prediction"])
def test_personalized_evaluation_and_trust_evidence_count_clients(
    corpus_dir, tmp_path, monkeypatch, strategy
):
    lines = _piped_run(tiny_tree(corpus_dir, tmp_path, strategy={"name": strategy}), tmp_path, monkeypatch)
    ends = _phase_ends(lines)
    clients = 4
    assert ends["round 0/2 · evaluation before training"] == (clients, clients)
    for r in (1, 2):
        assert ends[f"round {r}/2 · evaluation"] == (clients, clients)
        assert ends[f"round {r}/2 · aggregation ({strategy})"] == (clients, clients)
    assert any(line.startswith("round 1/2 · evaluation: 1/4 · ") for line in lines)  # counted as it goes


def test_fedcollm_evaluation_counts_choices_and_validation_shows_in_distillation(
    task_file,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    tree_ = cotuning_tree(task_file, tmp_path)
    lines = _piped_run(tree_, tmp_path, monkeypatch)
    ends = _phase_ends(lines)
    mc = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["type"] == "mc"]
    for r in (0, 1, 2):
        scored = sum(3 * m["n"] for m in mc if m["round"] == r)  # SLM and LLM, 3 choices per question
        assert scored > 0
        assert ends[f"round {r}/2 · evaluation on the test split"] == (scored, scored)
    distilling = [x for x in lines if x.startswith("round 1 · mutual distillation: ")]
    assert any(re.search(r"· (SLM|LLM) validation \d+/\d+ choices$", x) for x in distilling)


def test_personalized_evaluation_on_generation_data_counts_the_decoded_examples(tmp_path, monkeypatch):
    """With generation data a round's evaluation is counted in the test examples the clients decode
    (each client's test split, capped by data.max_test_windows), not in clients."""
    from tests.test_personalized_generation import gen_tree

    tree_ = gen_tree(tmp_path, data={"test_fraction": 0.3, "max_test_windows": 2})
    lines = _piped_run(tree_, tmp_path, monkeypatch)
    ends = _phase_ends(lines)
    gens = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["type"] == "gen"]
    for r, what in ((0, "evaluation before training"), (1, "evaluation"), (2, "evaluation")):
        decoded = sum(g["n"] for g in gens if g["round"] == r)
        assert decoded == 4 * 2  # 4 clients, each 2 test examples (the cap): more than the clients
        assert ends[f"round {r}/2 · {what}"] == (decoded, decoded)
