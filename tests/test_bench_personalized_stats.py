"""bench/personalized_quality.py's statistics: clients are averaged within their seed before any interval,
seeds won are counted per seed (not per (seed, client) pair), and the declared method (validation trust)
is paired with every other strategy by seed. Hand-computed values; no run, no model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import load_bench_script

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "personalized_quality.py"
T_975_DF2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2)


@pytest.fixture(scope="module")
def bench():
    return load_bench_script(BENCH, "personalized_quality_stats")


def entry(final_ppl: dict[int, dict[int, float]]) -> dict:
    return {"final_ppl": {str(s): {str(c): p for c, p in pc.items()} for s, pc in final_ppl.items()}}


def strategies() -> dict[str, dict]:
    # seed means: local 11, 21, 31; fedavg 10, 20, 33; validation 9, 19, 30 (two clients per seed)
    return {
        "local": entry({0: {0: 10.0, 1: 12.0}, 1: {0: 20.0, 1: 22.0}, 2: {0: 30.0, 1: 32.0}}),
        "fedavg": entry({0: {0: 9.0, 1: 11.0}, 1: {0: 19.0, 1: 21.0}, 2: {0: 32.0, 1: 34.0}}),
        "validation": entry({0: {0: 8.0, 1: 10.0}, 1: {0: 18.0, 1: 20.0}, 2: {0: 29.0, 1: 31.0}}),
    }


def test_levels_are_summaries_of_seed_means(bench):
    s = strategies()
    bench.seed_statistics(s)
    local = s["local"]
    assert local["seed_means"] == {"0": 11.0, "1": 21.0, "2": 31.0}
    se = 10.0 / math.sqrt(3)  # sample sd of 11, 21, 31 is 10
    assert local["summary"]["n"] == 3 and local["summary"]["mean"] == pytest.approx(21.0)
    assert local["summary"]["se"] == pytest.approx(se)
    assert local["summary"]["low"] == pytest.approx(21.0 - T_975_DF2 * se)
    assert "wins" not in local and "std_over_clients_and_seeds" not in local


def test_seeds_won_count_seeds_not_client_pairs(bench):
    s = strategies()
    bench.seed_statistics(s)
    assert s["fedavg"]["seeds_won"] == {"local": [2, 3]}  # 10 < 11, 20 < 21, 33 > 31
    assert s["validation"]["seeds_won"] == {"local": [3, 3], "fedavg": [3, 3]}


def test_the_declared_method_is_paired_by_seed_with_its_interval_and_verdict(bench):
    s = strategies()
    bench.seed_statistics(s)
    paired = s["validation"]["paired"]
    assert set(paired) == {"local", "fedavg"}
    local = paired["local"]  # differences -2, -2, -1: mean -5/3, sample sd 1/sqrt(3)
    assert local["by_seed"] == {"0": -2.0, "1": -2.0, "2": -1.0}
    se = (1 / math.sqrt(3)) / math.sqrt(3)
    assert local["summary"]["mean"] == pytest.approx(-5 / 3)
    assert local["summary"]["high"] == pytest.approx(-5 / 3 + T_975_DF2 * se)  # -0.233: excludes 0
    assert local["verdict"] == "significant"
    fedavg = paired["fedavg"]  # -1, -1, -3: mean -5/3, sd 2/sqrt(3), interval covers 0
    assert fedavg["summary"]["high"] > 0 and fedavg["verdict"] == "not significant"


def test_from_results_rewrites_the_tables_without_run_directories(tmp_path):
    """--from-results on a results file of the old layout (pooled client std, client-pair wins)."""
    work = tmp_path / "bench"
    (work / "results").mkdir(parents=True)
    script = work / "personalized_quality.py"
    script.write_text(BENCH.read_text().replace("ROOT = HERE.parent", f"ROOT = Path({str(ROOT)!r})"))
    old = {}
    for s, e in strategies().items():
        old[s] = {
            **e,
            "final_val_ppl": {},
            "mean": 0.0,
            "val_mean": 1.0,
            "std_over_clients_and_seeds": 1.0,
            "std_of_seed_means": 1.0,
            "seeds": [0, 1, 2],
            "curves": {"0": [[0, 12.0], [1, 11.0]]},
            "mean_round_wall_s": 1.0,
            "bytes_up_per_round": {},
            "wins": {"local": [5, 6]},
        }
    budget = {"clients": 2, "rank": 4}
    result = {"name": "pq", "machine": "test", "settings": {"s": {"strategies": old, "budget": budget}}}
    (work / "results" / "pq.json").write_text(json.dumps(result))
    done = subprocess.run(
        [sys.executable, str(script), "--from-results", "--name", "pq"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    md = (work / "results" / "pq.md").read_text()
    assert "| local | -1.67 ± 0.33 (95% CI -3.10 to -0.23) | -2.00, -2.00, -1.00 | significant" in md
    assert "| fedavg | " in md and "not significant |" in md
    rewritten = json.loads((work / "results" / "pq.json").read_text())
    assert "wins" not in rewritten["settings"]["s"]["strategies"]["local"]
    assert (work / "results" / "pq_s.png").is_file()
