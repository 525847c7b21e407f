"""Metrics reading and the comparison report, on run directories written by hand."""

from __future__ import annotations

import json
import math
import re
import statistics
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from cotune.reporting.metrics import append_metrics, load_run, load_runs, read_metrics
from cotune.reporting.report import comparison_rows, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# round -> per-client val ppl (clients 0, 1, 2); round 0 is before training
WEIGHT_PPL = {0: [100.0, 110.0, 120.0], 1: [40.0, 50.0, 60.0], 2: [10.0, 20.0, 30.0]}
FEDAVG_PPL = {0: [100.0, 110.0, 120.0], 1: [45.0, 44.0, 43.0], 2: [12.0, 18.0, 27.0]}
TRUST_R1 = [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]]
TRUST_R2 = [[0.8, 0.1, 0.1], [0.05, 0.9, 0.05], [0.2, 0.3, 0.5]]


def _config(strategy: str) -> dict[str, Any]:
    return {
        "algorithm": "personalized",
        "model": {"name": "tiny"},
        "federation": {"clients": 3, "rounds": 2},
        "strategy": {"name": strategy},
        "run": {"seed": 7},
    }


def _records(strategy: str, ppl: dict[int, list[float]], trust: bool) -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = [
        {"type": "run", "event": "start", "strategy": strategy, "algorithm": "personalized", "time": 0.0}
    ]
    for rnd, values in ppl.items():
        if rnd > 0:
            for c in range(3):
                recs.append(
                    {"type": "train", "round": rnd, "client": c, "step": rnd * 10, "loss": 3.0, "lr": 1e-3}
                )
            if trust:
                matrix = TRUST_R1 if rnd == 1 else TRUST_R2
                recs.append(
                    {"type": "trust", "round": rnd, "step": rnd * 10, "strategy": strategy, "matrix": matrix}
                )
        for c, value in enumerate(values):
            recs.append(
                {
                    "type": "eval",
                    "round": rnd,
                    "step": rnd * 10,
                    "client": c,
                    "split": "test",
                    "loss": math.log(value),
                    "ppl": value,
                    "acc": 0.1,
                    "tokens": 1000,
                    "future_field": {"x": 1},  # unknown fields are ignored
                }
            )
        recs.append({"type": "round", "round": rnd, "step": rnd * 10, "wall_s": 1.5, "mean_val_ppl": None})
    # records of types the reader does not know, and a validation eval (the trust's split): all ignored
    # when the run has a test split
    recs.append({"type": "fedcollm_acc", "round": 2, "client": 0, "acc": 0.9})
    recs.append({"type": "eval", "round": 2, "step": 20, "client": 0, "split": "val", "ppl": 1e6})
    recs.append(
        {"type": "run", "event": "end", "strategy": strategy, "algorithm": "personalized", "time": 9.0}
    )
    return recs


def _make_run(
    root: Path, name: str, strategy: str, ppl: dict[int, list[float]], trust: bool, tail: str = ""
) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(_config(strategy)))
    lines = [json.dumps(r) for r in _records(strategy, ppl, trust)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    # the first run was killed while writing its last line
    weight = _make_run(tmp_path, "run_weight", "weight", WEIGHT_PPL, trust=True, tail='{"type": "eval", "rou')
    fedavg = _make_run(tmp_path, "run_fedavg", "fedavg", FEDAVG_PPL, trust=False)
    return weight, fedavg


def test_read_metrics_skips_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "round", "round": 0}\n[1, 2]\n{"type": "round", "round": 1}\n{"type": "ev')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cut last line is expected, not worth a warning
        records = read_metrics(path)
    assert records == [{"type": "round", "round": 0}, {"type": "round", "round": 1}]


def test_append_after_truncation_keeps_new_record(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    append_metrics(path, {"type": "round", "round": 0, "wall_s": 1.0})
    with path.open("a") as fh:
        fh.write('{"type": "round", "ro')  # a writer killed mid-line
    append_metrics(path, {"type": "round", "round": 1, "mean_val_ppl": math.inf})
    with pytest.warns(UserWarning, match="line 2"):
        records = read_metrics(path)
    assert [r["round"] for r in records] == [0, 1]
    assert records[1]["mean_val_ppl"] == math.inf
    assert path.read_text().endswith("\n")


def test_load_run_picks_final_round(runs: tuple[Path, Path]) -> None:
    run = load_run(runs[0])
    assert run.label == "weight"
    assert run.config["run"]["seed"] == 7
    assert sorted(run.ppl_by_round) == [0, 1, 2]
    assert run.final_round() == 2
    assert run.final_ppl() == {0: 10.0, 1: 20.0, 2: 30.0}  # not round 0/1, and not the "test" split
    assert run.mean_ppl_curve() == [(0, 110.0), (1, 50.0), (2, 20.0)]
    assert [r for r, _ in run.trust] == [1, 2]
    assert run.last_trust() == (2, TRUST_R2)
    assert run.ended


def test_partial_last_round_is_not_final(tmp_path: Path) -> None:
    """A run killed during evaluation: round 3 has one client only, so round 2 stays the final one."""
    run_dir = _make_run(tmp_path, "killed", "validation", WEIGHT_PPL, trust=True)
    append_metrics(
        run_dir / "metrics.jsonl",
        {"type": "eval", "round": 3, "step": 30, "client": 0, "split": "val", "loss": 1.0, "ppl": 2.0},
    )
    run = load_run(run_dir)
    assert run.final_round() == 2
    assert run.final_ppl() == {0: 10.0, 1: 20.0, 2: 30.0}
    assert [r for r, _ in run.mean_ppl_curve()] == [0, 1, 2]


def test_comparison_rows_mean_std(runs: tuple[Path, Path]) -> None:
    header, rows = comparison_rows(load_runs(list(runs)))
    assert header == ["client", "weight", "fedavg"]
    assert rows[:3] == [["0", "10.00", "12.00"], ["1", "20.00", "18.00"], ["2", "30.00", "27.00"]]
    # by hand: weight 10,20,30 -> mean 20, std sqrt((100+0+100)/3); fedavg 12,18,27 -> mean 19,
    # deviations -7,-1,8 -> std sqrt(114/3) = sqrt(38). Population std over the clients.
    weight_std, fedavg_std = math.sqrt(200 / 3), math.sqrt(38)
    assert weight_std == pytest.approx(statistics.pstdev([10, 20, 30]))
    assert fedavg_std == pytest.approx(statistics.pstdev([12, 18, 27]))
    assert rows[3] == ["mean ± std", f"20.00 ± {weight_std:.2f}", f"19.00 ± {fedavg_std:.2f}"]
    assert rows[3] == ["mean ± std", "20.00 ± 8.16", "19.00 ± 6.16"]


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"


def test_write_report(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = write_report(list(runs), out)
    assert report == out / "report.md"
    text = report.read_text()

    # what was compared
    for needle in (
        "weight",
        "fedavg",
        "tiny",
        "personalized",
        str(runs[0].resolve()),
        str(runs[1].resolve()),
    ):
        assert needle in text
    # final per-client table, with the mean ± std row
    assert "| mean ± std | 20.00 ± 8.16 | 19.00 ± 6.16 |" in text
    assert "| 2 | 30.00 | 27.00 |" in text
    # mean val ppl per round: weight 110, 50, 20; fedavg 110, 44, 19
    assert "| 1 | 50.00 | 44.00 |" in text
    assert "| 2 | 20.00 | 19.00 |" in text
    # the last trust matrix of the weight run (round 2), not the first one
    assert "### weight (round 2)" in text
    assert "| 2 | 0.200 | 0.300 | 0.500 |" in text
    assert "### fedavg" in text and "No trust records." in text

    plots = {
        "plots/ppl_per_round.png",
        "plots/ppl_per_client.png",
        "plots/trust_weight.png",
    }
    links = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text))
    assert links == plots
    for rel in plots:
        _assert_png(out / rel)
    assert not (out / "plots" / "trust_fedavg.png").exists()


def test_report_without_trust_defaults_to_first_run_dir(runs: tuple[Path, Path]) -> None:
    fedavg = runs[1]
    report = write_report([fedavg])
    assert report == fedavg / "report.md"
    text = report.read_text()
    assert "No trust records." in text
    assert "| mean ± std | 19.00 ± 6.16 |" in text
    _assert_png(fedavg / "plots" / "ppl_per_round.png")
    _assert_png(fedavg / "plots" / "ppl_per_client.png")
    assert not list((fedavg / "plots").glob("trust_*.png"))


def test_duplicate_strategies_get_dir_names(tmp_path: Path) -> None:
    a = _make_run(tmp_path, "seed0", "fedavg", FEDAVG_PPL, trust=False)
    b = _make_run(tmp_path, "seed1", "fedavg", WEIGHT_PPL, trust=False)
    header, _ = comparison_rows(load_runs([a, b]))
    assert header == ["client", "fedavg (seed0)", "fedavg (seed1)"]


def test_missing_run_dir_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"run directory not found: .*nope"):
        load_run(missing)
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        write_report([missing])

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no metrics\.jsonl in .*empty"):
        load_run(empty)
