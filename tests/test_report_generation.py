"""The report's generation sections (final scores per model / client, ROUGE-L per round) and the trackers'
tags for generation records, on run directories written by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from tests.test_run_safety import cotune

from cotune.records import GenRecord
from cotune.reporting.metrics import load_run, load_runs
from cotune.reporting.report import gen_round_rows, gen_rows, print_rows_for_cli, write_report
from cotune.reporting.trackers import scalars

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _gen(rnd: int, em: float, f1: float, rouge: float, ppl: float, **kw: Any) -> dict[str, Any]:
    return {
        "type": "gen",
        "round": rnd,
        "n": 50,
        "exact_match": em,
        "f1": f1,
        "rouge_l": rouge,
        "ppl": ppl,
        **kw,
    }


def _write_run(root: Path, name: str, config: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({"federation": {"clients": 2, "rounds": 2}, **config})
    )
    recs = [
        {"type": "run", "event": "start", "time": 0.0},
        *records,
        {"type": "run", "event": "end", "time": 1.0},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run_dir


def _fedcollm(root: Path) -> Path:
    """Global SLM and LLM scored at rounds 0 and 1 (no multiple-choice records: a generation task)."""
    return _write_run(
        root,
        "fedcollm",
        {"algorithm": "fedcollm"},
        [
            _gen(0, 0.10, 0.20, 0.25, 30.0, model="slm"),
            _gen(0, 0.20, 0.30, 0.35, 20.0, model="llm"),
            _gen(1, 0.20, 0.40, 0.45, 12.0, model="slm"),
            _gen(1, 0.30, 0.50, 0.55, 9.0, model="llm"),
        ],
    )


def _personalized(root: Path) -> Path:
    """Two clients at rounds 0 and 1; round 2 has only client 0 (killed mid-evaluation); a validation
    record, left out since the run has test figures."""
    return _write_run(
        root,
        "personal",
        {"algorithm": "personalized", "strategy": {"name": "fedavg"}},
        [
            _gen(0, 0.0, 0.10, 0.10, 50.0, client=0),
            _gen(0, 0.0, 0.10, 0.20, 60.0, client=1),
            _gen(1, 0.10, 0.30, 0.40, 10.0, client=0),
            _gen(1, 0.30, 0.50, 0.60, 14.0, client=1),
            _gen(2, 0.90, 0.90, 0.90, 2.0, client=0),
            _gen(1, 0.99, 0.99, 0.99, 1.0, client=0, split="val"),
        ],
    )


def test_final_scores_per_model_and_client(tmp_path):
    fed, personal = load_runs([_fedcollm(tmp_path), _personalized(tmp_path)])
    assert fed.final_gen_round() == 1 and personal.final_gen_round() == 1  # round 2 is incomplete
    header, rows = gen_rows([fed, personal])
    assert header == ["run", "model", "client", "round", "exact match", "F1", "ROUGE-L", "response ppl", "n"]
    assert rows == [
        ["fedcollm", "LLM", "global", "1", "30.00", "50.00", "55.00", "9.00", "50"],
        ["fedcollm", "SLM", "global", "1", "20.00", "40.00", "45.00", "12.00", "50"],
        ["fedavg", "—", "0", "1", "10.00", "30.00", "40.00", "10.00", "50"],
        ["fedavg", "—", "1", "1", "30.00", "50.00", "60.00", "14.00", "50"],
        # mean ± population std over the two clients: EM 20 ± 10, F1 40 ± 10, ROUGE-L 50 ± 10, ppl 12 ± 2
        [
            "fedavg",
            "—",
            "mean ± std",
            "1",
            "20.00 ± 10.00",
            "40.00 ± 10.00",
            "50.00 ± 10.00",
            "12.00 ± 2.00",
            "100",
        ],
    ]


def test_rouge_l_per_round(tmp_path):
    runs = load_runs([_fedcollm(tmp_path), _personalized(tmp_path)])
    header, rows = gen_round_rows(runs)
    assert header == ["round", "fedcollm LLM", "fedcollm SLM", "fedavg"]
    assert rows == [["0", "35.00", "25.00", "15.00"], ["1", "55.00", "45.00", "50.00"]]


def test_report_has_the_generation_sections_and_no_multiple_choice_ones(tmp_path):
    fed, personal = _fedcollm(tmp_path), _personalized(tmp_path)
    path = write_report([fed, personal], tmp_path / "out")
    md = path.read_text()
    assert "## Generation: final test scores" in md
    assert "| fedcollm | SLM | global | 1 | 20.00 | 40.00 | 45.00 | 12.00 | 50 |" in md
    assert "## Generation: test ROUGE-L per round" in md
    assert "![test ROUGE-L per round](plots/rouge_l_per_round.png)" in md
    assert (tmp_path / "out" / "plots" / "rouge_l_per_round.png").read_bytes().startswith(PNG_MAGIC)
    assert "## Co-tuning: multiple-choice" not in md and "accuracy per round" not in md  # no choices here
    titles = [title for title, _, _ in print_rows_for_cli(load_runs([fed, personal]))]
    assert "Generation: final test scores" in titles and not any("accuracy" in t.lower() for t in titles)


def test_cotune_report_prints_the_generation_table(tmp_path, capsys):
    fed = _fedcollm(tmp_path)
    code, text = cotune(capsys, "report", fed, "--out", tmp_path / "rep")
    assert code == 0, text
    assert "Generation: final test scores" in text and "45.00" in text
    assert load_run(fed).gen[1] == GenRecord(  # sorted by (split, round, model, client)
        round=0, n=50, exact_match=0.1, f1=0.2, rouge_l=0.25, ppl=30.0, model="slm"
    )


def test_validation_only_runs_are_labelled_so(tmp_path):
    run = _write_run(
        tmp_path, "val", {"algorithm": "fedcollm"}, [_gen(1, 0.5, 0.5, 0.5, 5.0, model="slm", split="val")]
    )
    md = write_report([run], tmp_path / "out").read_text()
    assert "## Generation: final validation scores" in md


def test_trackers_mirror_generation_records():
    slm = GenRecord(round=2, n=40, exact_match=0.25, f1=0.5, rouge_l=0.4, ppl=7.5, model="slm")
    assert dict(scalars(slm)) == {
        "gen/slm/test/exact_match": 0.25,
        "gen/slm/test/f1": 0.5,
        "gen/slm/test/rouge_l": 0.4,
        "gen/slm/test/ppl": 7.5,
    }
    client = GenRecord(round=1, n=40, exact_match=0.0, f1=0.1, rouge_l=0.2, ppl=9.0, split="val", client=3)
    assert dict(scalars(client)) == {
        "gen/val/exact_match/client-03": 0.0,
        "gen/val/f1/client-03": 0.1,
        "gen/val/rouge_l/client-03": 0.2,
        "gen/val/ppl/client-03": 9.0,
    }
