"""The FedCoLLM-family report (accuracy table, accuracy plot, traffic), on run directories written by hand."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from cotune.reporting.metrics import load_run, load_runs
from cotune.reporting.report import (
    COTUNING_HEADER,
    comm_rows,
    comparison_rows,
    cotuning_rows,
    human_bytes,
    print_rows_for_cli,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FULL_SLM = 480_000_000  # bytes of the full SLM; adapters below are 0.25% / 0.26% of it

# base models before training (round 0): the same for every run
SLM_ZS = (0.40, 0.42)
LLM_ZS = (0.55, 0.57)
# standalone, final round 2, per client: acc and acc_norm
STANDALONE_R2 = [(0.50, 0.52), (0.56, 0.54), (0.59, 0.62)]


def _mc(rnd: int, model: str, acc: float, acc_norm: float, client: int | None = None) -> dict[str, Any]:
    return {
        "type": "mc",
        "round": rnd,
        "model": model,
        "client": client,
        "acc": acc,
        "acc_norm": acc_norm,
        "n": 200,
    }


def _comm(rnd: int, client: int, up: int, down: int) -> dict[str, Any]:
    return {
        "type": "comm",
        "round": rnd,
        "client": client,
        "bytes_up": up,
        "bytes_down": down,
        "full_slm_bytes": FULL_SLM,
        "ratio": up / FULL_SLM,
    }


def _write_run(root: Path, name: str, algorithm: str, records: list[dict[str, Any]]) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {
        "algorithm": algorithm,
        "model": {"name": "slm-tiny"},
        "llm": {"model": {"name": "llm-big"}},
        "federation": {"clients": 3, "rounds": 2},
        "run": {"seed": 3},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    recs = [
        {"type": "run", "event": "start", "algorithm": algorithm, "time": 0.0},
        *records,
        {"type": "run", "event": "end", "algorithm": algorithm, "time": 5.0},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run_dir


def _zero_shot(root: Path) -> Path:
    return _write_run(root, "zs", "zero_shot", [_mc(0, "slm", *SLM_ZS), _mc(0, "llm", *LLM_ZS)])


def _standalone(root: Path) -> Path:
    recs: list[dict[str, Any]] = [_mc(0, "slm", *SLM_ZS, client=c) for c in range(3)]
    recs.append(_mc(0, "llm", *LLM_ZS))  # an untrained model may still be logged at round 0
    recs += [
        {"type": "train", "round": 1, "client": c, "model": "slm", "step": 5, "loss": 2.0} for c in range(3)
    ]
    recs += [_mc(1, "slm", 0.45, 0.47, client=c) for c in range(3)]
    recs += [_mc(2, "slm", acc, norm, client=c) for c, (acc, norm) in enumerate(STANDALONE_R2)]
    recs.append(_mc(3, "slm", 0.99, 0.99, client=0))  # killed during round 3's evaluation: not final
    return _write_run(root, "standalone", "standalone", recs)


def _fedavg(root: Path) -> Path:
    recs = [
        _mc(0, "slm", *SLM_ZS),
        _mc(0, "llm", *LLM_ZS),
        _mc(1, "slm", 0.52, 0.53),
        _mc(2, "slm", 0.58, 0.60),
    ]
    recs += [_comm(r, c, 1_200_000, 1_200_000) for r in (1, 2) for c in range(3)]
    return _write_run(root, "fedavg", "fedavg", recs)


def _fedcollm(root: Path) -> Path:
    recs = [_mc(0, "slm", *SLM_ZS), _mc(0, "llm", *LLM_ZS)]
    recs += [_mc(1, "slm", 0.55, 0.56), _mc(1, "llm", 0.64, 0.65)]
    recs += [_mc(2, "slm", 0.61, 0.63), _mc(2, "llm", 0.68, 0.70)]
    recs += [_comm(r, c, 1_200_000, 1_250_000) for r in (1, 2) for c in range(3)]
    recs.append(
        {
            "type": "distill",
            "round": 1,
            "step": 4,
            "slm_ce": 2.0,
            "slm_kd": 0.5,
            "llm_ce": 1.5,
            "llm_kd": 0.4,
            "teacher_bytes": 1000,
            "wall_s": 1.0,
        }
    )
    return _write_run(root, "fedcollm", "fedcollm", recs)


def _centralized(root: Path) -> Path:
    recs = [_mc(0, "llm", *LLM_ZS), _mc(1, "llm", 0.66, 0.67), _mc(2, "llm", 0.686, 0.70)]
    return _write_run(root, "centralized", "centralized", recs)


def _personalized(root: Path, strategy: str = "weight") -> Path:
    """A minimal personalized run: val perplexity of 2 clients at rounds 0 and 1, one trust matrix."""
    run_dir = root / f"pers_{strategy}"
    run_dir.mkdir(parents=True)
    config = {"algorithm": "personalized", "model": {"name": "tiny"}, "strategy": {"name": strategy}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    recs: list[dict[str, Any]] = [
        {"type": "eval", "round": r, "client": c, "split": "val", "ppl": ppl}
        for r, per_client in ((0, [100.0, 120.0]), (1, [10.0, 30.0]))
        for c, ppl in enumerate(per_client)
    ]
    recs.append({"type": "trust", "round": 1, "matrix": [[0.7, 0.3], [0.4, 0.6]]})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run_dir


@pytest.fixture
def family(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "runs"
    return {
        "zero_shot": _zero_shot(root),
        "standalone": _standalone(root),
        "fedavg": _fedavg(root),
        "fedcollm": _fedcollm(root),
        "centralized": _centralized(root),
    }


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"


def _row(rows: list[list[str]], setting: str) -> list[str]:
    matches = [row for row in rows if row[0] == setting]
    assert len(matches) == 1, (setting, rows)
    return matches[0]


def test_load_run_reads_mc_and_comm(family: dict[str, Path]) -> None:
    run = load_run(family["standalone"])
    assert run.algorithm == "standalone" and run.is_cotuning
    assert run.label == "standalone"  # the algorithm, not a strategy
    assert sorted(run.mc) == ["llm", "slm"]
    assert [r.client for r in run.mc["slm"][2]] == [0, 1, 2]
    assert run.mc_rounds("slm") == [0, 1, 2]  # round 3 has client 0 only
    acc, acc_norm, std = run.final_mc("slm") or (0.0, 0.0, None)
    accs = [a for a, _ in STANDALONE_R2]
    # by hand: 0.50, 0.56, 0.59 -> mean 0.55; deviations -0.05, 0.01, 0.04 -> std sqrt(0.0042 / 3)
    assert acc == pytest.approx(0.55) and acc == pytest.approx(statistics.fmean(accs))
    assert acc_norm == pytest.approx(0.56)
    assert std == pytest.approx(math.sqrt(0.0042 / 3)) and std == pytest.approx(statistics.pstdev(accs))
    assert run.zero_shot_mc("slm") == pytest.approx((0.40, 0.42, 0.0))
    assert run.final_mc("llm") == (0.55, 0.57, None)  # only round 0 logged; a global model has no spread

    fed = load_run(family["fedcollm"])
    assert fed.label == "fedcollm"
    assert fed.final_mc("llm") == (0.68, 0.70, None)
    assert fed.zero_shot_mc("llm") == (0.55, 0.57, None)
    assert fed.mc_curve("slm") == [(0, 0.40), (1, 0.55), (2, 0.61)]
    per_round = fed.comm_per_round()
    assert [r["round"] for r in per_round] == [1, 2]
    assert per_round[0]["clients"] == 3
    assert per_round[0]["bytes_up"] == 1_200_000 and per_round[0]["bytes_down"] == 1_250_000
    assert per_round[0]["ratio"] == pytest.approx(0.0025)
    assert load_run(family["centralized"]).final_mc("slm") is None
    assert load_run(family["zero_shot"]).final_mc_round() == 0


def test_cotuning_table(family: dict[str, Path]) -> None:
    header, rows = cotuning_rows(load_runs(list(family.values())))
    assert header == COTUNING_HEADER == ["setting", "acc (%)", "acc_norm (%)", "run"]
    assert [row[0] for row in rows] == [
        "SLM zero-shot",
        "SLM standalone",
        "SLM FedAvg",
        "SLM FedCoLLM",
        "LLM zero-shot",
        "LLM centralized",
        "LLM FedCoLLM",
        "LLM FedCoLLM / centralized",
    ]
    assert _row(rows, "SLM zero-shot") == ["SLM zero-shot", "40.00", "42.00", "zero_shot"]
    # standalone: acc 55.00 ± 3.74 (see test_load_run_reads_mc_and_comm); acc_norm 0.52, 0.54, 0.62 ->
    # mean 0.56, deviations -0.04, -0.02, 0.06 -> std sqrt(0.0056 / 3) = 4.32%
    assert math.sqrt(0.0056 / 3) == pytest.approx(statistics.pstdev([n for _, n in STANDALONE_R2]))
    assert _row(rows, "SLM standalone") == ["SLM standalone", "55.00 ± 3.74", "56.00 ± 4.32", "standalone"]
    assert _row(rows, "SLM FedAvg") == ["SLM FedAvg", "58.00", "60.00", "fedavg"]
    assert _row(rows, "SLM FedCoLLM") == ["SLM FedCoLLM", "61.00", "63.00", "fedcollm"]
    assert _row(rows, "LLM zero-shot") == ["LLM zero-shot", "55.00", "57.00", "zero_shot"]
    assert _row(rows, "LLM centralized") == ["LLM centralized", "68.60", "70.00", "centralized"]
    assert _row(rows, "LLM FedCoLLM") == ["LLM FedCoLLM", "68.00", "70.00", "fedcollm"]
    # 0.68 / 0.686 = 99.125...%; acc_norm 0.70 / 0.70 = 100%
    assert _row(rows, "LLM FedCoLLM / centralized") == [
        "LLM FedCoLLM / centralized",
        "99.13%",
        "100.00%",
        "fedcollm / centralized",
    ]


def test_the_lambda_zero_control_gets_its_row_when_it_ran(family: dict[str, Path], tmp_path: Path) -> None:
    """fedavg_ft (FedAvg + server fine-tuning, lambda = 0) has a row after FedAvg's when a run of it is
    there, and none (not a row of "—") in a table without one."""
    recs = [_mc(0, "slm", *SLM_ZS), _mc(1, "slm", 0.54, 0.55), _mc(2, "slm", 0.60, 0.61)]
    recs += [_comm(r, c, 1_200_000, 1_200_000) for r in (1, 2) for c in range(3)]
    control = _write_run(tmp_path / "runs", "fedavg_ft", "fedavg_ft", recs)
    _, rows = cotuning_rows(load_runs([*family.values(), control]))
    setting = "SLM FedAvg + server fine-tuning (λ=0)"
    assert _row(rows, setting) == [setting, "60.00", "61.00", "fedavg_ft"]
    assert [row[0] for row in rows].index(setting) == [row[0] for row in rows].index("SLM FedAvg") + 1
    _, without = cotuning_rows(load_runs(list(family.values())))
    assert setting not in [row[0] for row in without]


def test_zero_shot_falls_back_to_round_0(family: dict[str, Path]) -> None:
    # no zero_shot run; standalone comes first but its round 0 is per client, so fedavg's global one is used
    runs = load_runs([family[k] for k in ("standalone", "fedavg", "fedcollm")])
    _, rows = cotuning_rows(runs)
    assert _row(rows, "SLM zero-shot") == ["SLM zero-shot", "40.00", "42.00", "fedavg, round 0"]
    assert _row(rows, "LLM zero-shot") == ["LLM zero-shot", "55.00", "57.00", "standalone, round 0"]
    # missing settings are rows of "—", and without a centralized run there is no ratio line
    assert _row(rows, "LLM centralized") == ["LLM centralized", "—", "—", "—"]
    assert not [row for row in rows if row[0] == "LLM FedCoLLM / centralized"]

    # only per-client round-0 records: used, with their (zero) spread
    _, rows = cotuning_rows(load_runs([family["standalone"]]))
    assert _row(rows, "SLM zero-shot") == [
        "SLM zero-shot",
        "40.00 ± 0.00",
        "42.00 ± 0.00",
        "standalone, round 0",
    ]
    assert _row(rows, "SLM FedCoLLM") == ["SLM FedCoLLM", "—", "—", "—"]


def test_comm_table(family: dict[str, Path]) -> None:
    header, rows = comm_rows(load_runs(list(family.values())))
    assert header[0] == "run" and len(header) == 6
    by_run = {row[0]: row for row in rows}
    # fedavg: 1.2 MB each way = 0.25% of 480 MB; total 2 rounds x 3 clients x 2.4 MB = 14.4 MB
    assert by_run["fedavg"] == ["fedavg", "2", "3", "1.2 MB (0.25%)", "1.2 MB (0.25%)", "14.4 MB"]
    # fedcollm: 1.25 MB down = 0.2604% -> 0.26%; total 6 x 2.45 MB = 14.7 MB
    assert by_run["fedcollm"] == ["fedcollm", "2", "3", "1.2 MB (0.25%)", "1.25 MB (0.26%)", "14.7 MB"]
    assert by_run["standalone"] == ["standalone", "—", "—", "—", "—", "—"]
    assert human_bytes(512) == "512 B"
    assert human_bytes(1_500) == "1.5 kB"
    assert human_bytes(2.5e9) == "2.5 GB"


def test_fedcollm_only_report(family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    text = write_report(list(family.values()), out).read_text()
    assert "## Co-tuning: multiple-choice test accuracy" in text
    assert "| SLM standalone | 55.00 ± 3.74 | 56.00 ± 4.32 | standalone |" in text
    assert "| LLM FedCoLLM / centralized | 99.13% | 100.00% | fedcollm / centralized |" in text
    assert "| fedavg | 2 | 3 | 1.2 MB (0.25%) | 1.2 MB (0.25%) | 14.4 MB |" in text
    assert "llm-big" in text and "slm-tiny" in text  # both models in the runs table
    # accuracy per round table: fedcollm SLM at round 1; fedavg's round-0-only LLM gets no column
    assert "fedcollm SLM" in text and "fedavg LLM" not in text and "zero_shot LLM" in text
    # no perplexity data: those sections are skipped, not crashed on
    assert "perplexity" not in text and "Trust matrices" not in text
    links = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text))
    assert links == {"plots/accuracy_per_round.png"}
    _assert_png(out / "plots" / "accuracy_per_round.png")
    assert not (out / "plots" / "ppl_per_round.png").exists()


def test_mixed_report_keeps_personalized_sections(family: dict[str, Path], tmp_path: Path) -> None:
    pers = _personalized(tmp_path / "runs")
    out = tmp_path / "mixed"
    text = write_report([pers, family["fedcollm"], family["centralized"]], out).read_text()
    # personalized sections, over the personalized run only (no empty fedcollm column)
    assert "## Final validation perplexity per client" in text
    assert "| client | weight |" in text
    assert "| mean ± std | 20.00 ± 10.00 |" in text
    assert "### weight (round 1)" in text and "No trust records." not in text
    # and the co-tuning ones
    assert "| LLM FedCoLLM | 68.00 | 70.00 | fedcollm |" in text
    assert "## Co-tuning: communication" in text
    for rel in ("ppl_per_round.png", "ppl_per_client.png", "trust_weight.png", "accuracy_per_round.png"):
        _assert_png(out / "plots" / rel)


def test_print_rows_for_cli(family: dict[str, Path], tmp_path: Path) -> None:
    pers = _personalized(tmp_path / "runs", strategy="fedavg")  # same label as the fedavg algorithm run
    runs = load_runs([pers, family["fedavg"], family["fedcollm"]])
    assert [run.label for run in runs] == ["fedavg (pers_fedavg)", "fedavg (fedavg)", "fedcollm"]
    tables = print_rows_for_cli(runs)
    assert len(tables) == 3
    (t_ppl, h_ppl, r_ppl), (t_acc, h_acc, r_acc), (t_comm, _, r_comm) = tables
    assert "perplexity" in t_ppl and (h_ppl, r_ppl) == comparison_rows(runs[:1])
    assert "accuracy" in t_acc and h_acc == COTUNING_HEADER
    assert _row(r_acc, "SLM FedAvg")[3] == "fedavg (fedavg)"
    assert "traffic" in t_comm and [row[0] for row in r_comm] == ["fedavg (fedavg)", "fedcollm"]

    # personalized only: just the perplexity table; co-tuning without traffic: no traffic table
    assert [t for t, _, _ in print_rows_for_cli(load_runs([pers]))] == [t_ppl]
    assert [t for t, _, _ in print_rows_for_cli(load_runs([family["zero_shot"]]))] == [t_acc]


def test_a_fedcollm_run_has_no_strategy_in_the_runs_table(family: dict[str, Path], tmp_path: Path) -> None:
    config = family["fedcollm"] / "config.yaml"  # as written before configs were per family
    config.write_text(config.read_text() + yaml.safe_dump({"strategy": {"name": "fedavg"}}))
    text = write_report([family["fedcollm"]], tmp_path / "out").read_text()
    assert "| fedcollm | — | fedcollm | slm-tiny |" in text
