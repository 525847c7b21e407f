"""bench/compression_pareto.py: the quality-against-bytes table from synthetic per-seed figures (no run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import load_bench_script

ROOT = Path(__file__).resolve().parents[1]
T_975_DF2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2)


@pytest.fixture(scope="module")
def bench():
    return load_bench_script(ROOT / "bench" / "compression_pareto.py", "compression_pareto_test")


def test_each_codec_against_the_uncompressed_run(bench):
    points = {
        "none": {"by_seed": {0: 30.0, 1: 32.0, 2: 34.0}, "bytes_per_client_round": 8000.0},
        "int8": {"by_seed": {0: 30.1, 1: 32.1, 2: 34.4}, "bytes_per_client_round": 2000.0},
        "nf4": {"by_seed": {0: 36.0, 1: 38.0, 2: 41.0}, "bytes_per_client_round": 1000.0},
    }
    rows = bench.frontier(points)
    assert rows["int8"]["x_fewer_bytes"] == 4.0 and rows["nf4"]["x_fewer_bytes"] == 8.0
    # none: mean 32, sample sd 2, s.e. 2/sqrt(3): 95% interval 32 ± 4.30 x 1.155 = [27.03, 36.97]
    half = T_975_DF2 * 2 / 3**0.5
    assert rows["none"]["quality"]["low"] == pytest.approx(32 - half)
    assert rows["int8"]["inside_none_interval"] is True  # mean 32.2
    assert rows["nf4"]["inside_none_interval"] is False  # mean 38.33
    # nf4 − none per seed: 6, 6, 7: mean 6.33, significant
    assert (
        rows["nf4"]["vs_none"]["mean"] == pytest.approx(19 / 3)
        and rows["nf4"]["vs_none"]["verdict"] == "significant"
    )
    assert "vs_none" not in rows["none"]
    md = bench.markdown({"t": rows}, {"t": "test perplexity"})
    assert "| nf4 | 1.0 kB | 8.0x | 38.333 ± 1.453 |" in md and "| no |" in md


def test_personalized_points_read_a_personalized_quality_results_file(bench, tmp_path):
    result = {
        "settings": {
            "bbc-topic": {
                "strategies": {
                    "fedavg": {
                        "seed_means": {"0": 50.0, "1": 52.0},
                        "bytes_up_per_round": {"0": 100.0, "1": 300.0},
                        "bytes_down_per_round": {"0": 200.0, "1": 200.0},
                    }
                }
            }
        }
    }
    p = bench.personalized_points(result, "bbc-topic", "fedavg")
    assert p == {"by_seed": {0: 50.0, 1: 52.0}, "bytes_per_client_round": 400.0}
    assert bench.personalized_points(result, "wiki-lang", "fedavg") is None


def test_a_fedavg_run_gives_its_final_slm_accuracy_and_traffic(bench, tmp_path):
    d = tmp_path / "s0"
    d.mkdir()
    lines = [
        {"type": "mc", "round": 0, "model": "slm", "client": None, "acc": 0.5},
        {"type": "comm", "round": 1, "client": 0, "bytes_up": 10.0, "bytes_down": 30.0},
        {"type": "comm", "round": 1, "client": 1, "bytes_up": 20.0, "bytes_down": 40.0},
        {"type": "mc", "round": 1, "model": "slm", "client": None, "acc": 0.75},
        {"type": "mc", "round": 1, "model": "slm", "client": 0, "acc": 0.1},
        {"type": "run", "event": "end"},
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))
    assert bench.fedavg_point(d) == (0.75, 50.0)
    (d / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")  # not ended
    assert bench.fedavg_point(d) is None
