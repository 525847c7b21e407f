"""`cotune report`'s "Over seeds" section: runs that differ only in their seed, summarised with the statistics
of cotune.reporting.stats (mean ± s.e., 95% t interval on n_seeds − 1 df, the first setting minus each other
one paired by seed). Run directories written by hand (no training), expectations computed by hand."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from cotune.cli.main import cli
from cotune.reporting.metrics import load_runs
from cotune.reporting.report import print_rows_for_cli, write_report
from cotune.reporting.stats import summarize

# final test perplexity of 4 clients per seed; seed means 13, 14, 18 (method) and 15, 17, 17 (fedavg)
METHOD = {0: [10.0, 12.0, 14.0, 16.0], 1: [11.0, 13.0, 15.0, 17.0], 2: [15.0, 17.0, 19.0, 21.0]}
FEDAVG = {0: [14.0, 15.0, 15.0, 16.0], 1: [16.0, 17.0, 17.0, 18.0], 2: [16.0, 17.0, 17.0, 18.0]}
# by hand: method's seed means 13, 14, 18 -> mean 15, sd sqrt(7), s.e. sqrt(7/3) = 1.5275;
# t(0.975, 2) = 4.302653 -> 15 ± 6.5723 = 8.43 to 21.57. fedavg's 15, 17, 17 -> mean 16.3333, sd 1.1547,
# s.e. 0.6667, ± 2.8684 = 13.46 to 19.20. Method − fedavg per seed: -2, -3, +1 -> mean -1.3333, sd 2.0817,
# s.e. 1.2019, ± 5.1712 = -6.50 to +3.84: covers 0, not significant.
METHOD_CELL = "+15.00 ± 1.53 (95% CI +8.43 to +21.57)"
FEDAVG_CELL = "+16.33 ± 0.67 (95% CI +13.46 to +19.20)"
PAIR_CELL = "-1.33 ± 1.20 (95% CI -6.50 to +3.84)"


def write_run(d: Path, config: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [{"type": "run", "event": "start"}, *records, {"type": "run", "event": "end"}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def personalized(
    d: Path, strategy: str, seed: int, ppl: list[float], lr: float = 1e-3, compare: list[str] | None = None
) -> Path:
    config = {
        "algorithm": "personalized",
        "model": {"name": "tiny"},
        "strategy": {"name": strategy},
        "train": {"lr": lr},
        "federation": {"clients": len(ppl), "rounds": 2},
        "run": {"seed": seed, "name": d.name, "out_dir": str(d.parent), "compare": compare or []},
    }
    evals = [
        {"type": "eval", "round": 2, "step": 20, "client": c, "split": "test", "loss": 1.0, "ppl": v}
        for c, v in enumerate(ppl)
    ]
    return write_run(d, config, evals)


@pytest.fixture
def two_settings(tmp_path: Path) -> list[Path]:
    """The method (given first; run with run.compare: [fedavg], as one invocation's main run) and fedavg (its
    compare siblings: their own strategy, compare emptied), 3 seeds each, in different out_dirs."""
    method = [
        personalized(tmp_path / f"a{s}" / "run", "validation", s, METHOD[s], compare=["fedavg"])
        for s in METHOD
    ]
    fedavg = [personalized(tmp_path / f"b{s}" / "run.fedavg", "fedavg", s, FEDAVG[s]) for s in FEDAVG]
    return method + fedavg


def tables(dirs: list[Path]) -> dict[str, tuple[list[str], list[list[str]]]]:
    return {title: (header, rows) for title, header, rows in print_rows_for_cli(load_runs(dirs))}


def seed_tables(dirs: list[Path]) -> list[tuple[list[str], list[list[str]]]]:
    return [table for title, table in tables(dirs).items() if title.startswith("Over seeds")]


def test_two_settings_three_seeds_by_hand(two_settings: list[Path]) -> None:
    # the hand-computed figures are those of the one implementation of the statistics
    method = summarize([13.0, 14.0, 18.0])
    assert (round(method.low, 2), round(method.high, 2)) == (8.43, 21.57)
    pair = summarize([-2.0, -3.0, 1.0])
    assert (round(pair.low, 2), round(pair.high, 2)) == (-6.50, 3.84) and pair.verdict() == "not significant"

    (s_header, s_rows), (p_header, p_rows) = seed_tables(two_settings)
    assert s_header[-1] == "mean ± s.e. (95% CI)" and p_header[-1] == "verdict"
    assert s_rows == [
        ["validation (tiny)", "—", "test perplexity", "3", METHOD_CELL],
        ["fedavg (tiny)", "—", "test perplexity", "3", FEDAVG_CELL],
    ]
    assert p_rows == [
        ["validation (tiny) − fedavg (tiny)", "—", "test perplexity", "3", PAIR_CELL, "not significant"]
    ]


def test_report_markdown_has_the_section(two_settings: list[Path], tmp_path: Path) -> None:
    text = write_report(two_settings, tmp_path / "out").read_text()
    section = text.split("## Over seeds", 1)[1]
    assert "only against the first setting given" in section
    for cell in (METHOD_CELL, FEDAVG_CELL, PAIR_CELL, "not significant"):
        assert cell in section


def test_cli_prints_the_section(two_settings: list[Path], tmp_path: Path) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            cli(["report", *map(str, two_settings), "--out", str(tmp_path / "out")])
        except SystemExit as ended:
            assert ended.code in (0, None)
    text = " ".join(out.getvalue().split())
    assert "Over seeds: the first setting minus each other one, paired by seed" in text
    assert "not significant" in text and "-6.50 to +3.84" in text


def test_clients_are_nested_in_their_seed(tmp_path: Path) -> None:
    """4 clients of one seed are one value: 3 seeds, the s.e. of the 3 seed means (not of 12 clients)."""
    dirs = [personalized(tmp_path / f"a{s}", "validation", s, METHOD[s]) for s in METHOD]
    ((_, rows),) = seed_tables(dirs)
    assert rows == [["validation (tiny)", "—", "test perplexity", "3", METHOD_CELL]]
    as_if_independent = summarize([v for values in METHOD.values() for v in values])
    assert as_if_independent.text() not in rows[0][-1]


def test_one_seed_per_setting_adds_nothing(tmp_path: Path) -> None:
    dirs = [
        personalized(tmp_path / "a", "validation", 0, METHOD[0]),
        personalized(tmp_path / "b", "fedavg", 0, FEDAVG[0]),
    ]
    assert seed_tables(dirs) == []
    assert "Over seeds" not in write_report(dirs, tmp_path / "out").read_text()


def test_settings_that_differ_beyond_the_seed_are_not_pooled(tmp_path: Path) -> None:
    # two runs of fedavg on seeds 0 and 1 but with another learning rate: two settings of one seed each
    dirs = [
        personalized(tmp_path / "a", "fedavg", 0, FEDAVG[0], lr=1e-3),
        personalized(tmp_path / "b", "fedavg", 1, FEDAVG[1], lr=1e-2),
    ]
    assert seed_tables(dirs) == []
    # with two seeds each, two rows: the second named by the key it differs in (not its value)
    dirs += [
        personalized(tmp_path / "c", "fedavg", 1, FEDAVG[1], lr=1e-3),
        personalized(tmp_path / "d", "fedavg", 0, FEDAVG[0], lr=1e-2),
    ]
    ((_, rows), (_, pairs)) = seed_tables(dirs)
    assert [row[0] for row in rows] == ["fedavg (tiny)", "fedavg (tiny) #2, differs in train.lr"]
    assert [row[3] for row in rows] == ["2", "2"]
    assert "0.01" not in " ".join(rows[1]) and pairs[0][-1] == "not significant"


def fedcollm_run(d: Path, algorithm: str, seed: int, slm: float, llm: float | None = None) -> Path:
    config = {
        "algorithm": algorithm,
        "model": {"name": "tiny"},
        "federation": {"clients": 2, "rounds": 2},
        "run": {"seed": seed},
    }
    recs = [{"type": "mc", "round": 2, "model": "slm", "client": None, "acc": slm, "acc_norm": slm, "n": 100}]
    if llm is not None:
        recs.append(
            {"type": "mc", "round": 2, "model": "llm", "client": None, "acc": llm, "acc_norm": llm, "n": 100}
        )
    return write_run(d, config, recs)


def test_fedcollm_family_accuracy_paired_significant(tmp_path: Path) -> None:
    """FedCoLLM − FedAvg SLM accuracy 0.10, 0.12, 0.11 per seed: mean 11.00 %, s.e. 0.58, ± 4.3027 x 0.5774
    = 8.52 to 13.48 (excludes 0: significant); the LLM figure has no FedAvg counterpart, so no pair."""
    fed = {0: 0.60, 1: 0.62, 2: 0.56}
    avg = {0: 0.50, 1: 0.50, 2: 0.45}
    dirs = [fedcollm_run(tmp_path / f"f{s}", "fedcollm", s, fed[s], llm=0.7) for s in fed]
    dirs += [fedcollm_run(tmp_path / f"g{s}", "fedavg", s, avg[s]) for s in avg]
    ((_, rows), (_, pairs)) = seed_tables(dirs)
    assert [row[:4] for row in rows] == [
        ["fedcollm (tiny)", "SLM", "accuracy (%)", "3"],
        ["fedcollm (tiny)", "LLM", "accuracy (%)", "3"],
        ["fedavg (tiny)", "SLM", "accuracy (%)", "3"],
    ]
    assert pairs == [
        [
            "fedcollm (tiny) − fedavg (tiny)",
            "SLM",
            "accuracy (%)",
            "3",
            "+11.00 ± 0.58 (95% CI +8.52 to +13.48)",
            "significant",
        ]
    ]


def test_a_non_finite_seed_is_named_not_summarized(tmp_path: Path) -> None:
    """A diverged run (infinite perplexity) leaves the setting without a summary; the report still renders."""
    dirs = [personalized(tmp_path / f"a{s}", "validation", s, METHOD[s]) for s in METHOD]
    dirs += [personalized(tmp_path / f"b{s}", "fedavg", s, [float("inf"), 1.0]) for s in (0, 1)]
    ((_, rows), (_, pairs)) = seed_tables(dirs)
    assert rows[1][-1] == "a value is not finite: no summary"
    assert pairs[0][-2:] == ["a value is not finite: no summary", "—"]
