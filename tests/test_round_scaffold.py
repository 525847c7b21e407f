"""The one round scaffold (runtime/rounds.py): both families walk the same phases in the same order, and a
run of either stopped during a round's evaluation (after its checkpoint) resumes to the same metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tests.conftest import tiny_tree
from tests.test_cotuning import task_file, tree  # noqa: F401  (task_file is a fixture)

from cotune.config import config_from_dict
from cotune.records import CLOCK_FIELDS
from cotune.reporting.metrics import read_metrics
from cotune.runtime import fedcollm, personalized
from cotune.runtime.checkpoint import latest_checkpoint
from cotune.runtime.experiment import resume_experiment, run_experiment

HOOKS = ("restore", "train", "aggregate", "checkpoint", "evaluate", "close_round")
CLOCK = CLOCK_FIELDS  # what differs between two identical runs


class Stopped(RuntimeError):
    """Stands for a kill during a round's evaluation."""


def record_hooks(monkeypatch, loop_class: type) -> list[tuple[str, int | None]]:
    """The loop's hook calls, in order, as (hook, round)."""
    calls: list[tuple[str, int | None]] = []
    for name in HOOKS:
        real = getattr(loop_class, name, None)
        if real is None:  # a loop without the hook: its absence shows in the order asserted
            continue

        def wrapped(self, *args, _name=name, _real=real):
            calls.append((_name, args[0] if args else None))
            return _real(self, *args)

        monkeypatch.setattr(loop_class, name, wrapped)
    return calls


def fresh_order(rounds: int) -> list[tuple[str, int | None]]:
    order = [("checkpoint", 0), ("evaluate", 0)]
    for r in range(1, rounds + 1):
        order += [("train", r), ("aggregate", r), ("checkpoint", r), ("evaluate", r), ("close_round", r)]
    return order


def resumed_order(after: int, rounds: int) -> list[tuple[str, int | None]]:
    """Resumed after round `after`, stopped during its evaluation: complete it, then the rounds left."""
    later = fresh_order(rounds)[2 + 5 * after :]
    return [("restore", None), ("evaluate", after), ("close_round", after), *later]


def stop_in(monkeypatch, loop_class: type, method: str, r: int, calls: int) -> None:
    """Raise `Stopped` at the `calls`-th call of `loop_class.method` for round r (records before it stay)."""
    real, seen = getattr(loop_class, method), []

    def stopping(self, round_, *args):
        if round_ == r:
            seen.append(1)
            if len(seen) == calls:
                raise Stopped
        return real(self, round_, *args)

    monkeypatch.setattr(loop_class, method, stopping)


def comparable(run_dir: Path) -> list[str]:
    """The run's metrics records in order, without run events and clock readings (NaN spelled out)."""
    out = []
    for m in read_metrics(run_dir / "metrics.jsonl"):
        if m["type"] == "run":
            continue
        kept = {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
        out.append(json.dumps({k: v for k, v in kept.items() if k not in CLOCK}, sort_keys=True))
    return out


def check_stopped_and_resumed(monkeypatch, loop_class, cfg, part: Path, full: Path, rounds: int):
    calls = record_hooks(monkeypatch, loop_class)
    with pytest.raises(Stopped):
        run_experiment(cfg)
    assert latest_checkpoint(part)[0] == 1  # the round's checkpoint was written before its evaluation
    assert calls == fresh_order(rounds)[:6]  # stopped in round 1's evaluation
    monkeypatch.undo()
    calls = record_hooks(monkeypatch, loop_class)
    resume_experiment(part)
    assert calls == resumed_order(1, rounds)
    assert comparable(part) == comparable(full)
    assert [m["round"] for m in read_metrics(part / "metrics.jsonl") if m["type"] == "round"] == [1, 2]


def test_personalized_runs_the_scaffold_and_resumes_a_stopped_evaluation(corpus_dir, tmp_path, monkeypatch):
    def cfg(name):
        return config_from_dict(tiny_tree(corpus_dir, tmp_path, run={"name": name, "threads": 1}))

    calls = record_hooks(monkeypatch, personalized.PersonalizedLoop)
    (full,) = run_experiment(cfg("full"))
    assert calls == fresh_order(2)
    monkeypatch.undo()
    # stopped while logging round 1's evaluation: one client's records are in, the others' are not
    stop_in(monkeypatch, personalized.PersonalizedLoop, "eval_record", 1, 2)
    check_stopped_and_resumed(
        monkeypatch, personalized.PersonalizedLoop, cfg("part"), tmp_path / "runs" / "part", full, 2
    )
    part_evals = [
        m for m in read_metrics(tmp_path / "runs" / "part" / "metrics.jsonl") if m["type"] == "eval"
    ]
    assert len(part_evals) == len({(m["round"], m["client"], m["split"]) for m in part_evals})  # each once


def test_fedcollm_runs_the_scaffold_and_resumes_a_stopped_evaluation(
    task_file,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    def cfg(name):
        return config_from_dict(tree(task_file, tmp_path, "fedavg", run={"name": name, "threads": 1}))

    calls = record_hooks(monkeypatch, fedcollm.FedCoLLMLoop)
    (full,) = run_experiment(cfg("full"))
    assert calls == fresh_order(2)
    monkeypatch.undo()
    stop_in(monkeypatch, fedcollm.FedCoLLMLoop, "log_mc", 1, 1)  # before round 1's accuracy is logged
    check_stopped_and_resumed(
        monkeypatch, fedcollm.FedCoLLMLoop, cfg("part"), tmp_path / "runs" / "part.fedavg", full, 2
    )
