"""bench/budget_sweep.py: the budget multiples' overrides and the side-by-side of their results (synthetic
results files built with personalized_quality's own statistics; no run, no model)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.conftest import load_bench_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep():
    return load_bench_script(ROOT / "bench" / "budget_sweep.py", "budget_sweep_test")


@pytest.fixture(scope="module")
def pq():
    return load_bench_script(ROOT / "bench" / "personalized_quality.py", "personalized_quality_budget")


def result(pq, gap: float, setting: str = "wiki-lang") -> dict:
    """Three seeds, two clients: local 20/30/40 (seed means 21, 31, 41), fedavg 1 lower, validation `gap`
    below fedavg on every seed but the last, where it is gap + 1 below."""

    def entry(shift: float, last: float = 0.0) -> dict:
        return {
            "final_ppl": {
                str(seed): {"0": base + shift - (last if seed == 2 else 0.0), "1": base + 2 + shift}
                for seed, base in enumerate((20.0, 30.0, 40.0))
            },
            "seeds": [0, 1, 2],
        }

    strategies = {"local": entry(0.0), "fedavg": entry(-1.0), "validation": entry(-1.0 - gap, 2.0)}
    pq.seed_statistics(strategies)
    return {"settings": {setting: {"strategies": strategies}}}


def test_a_multiple_scales_steps_and_windows_but_not_rounds(sweep):
    assert sweep.iterations(1) == 8 and sweep.iterations(16) == 128
    assert sweep.overrides(4) == [
        "data.seq_len=128",
        "federation.warmup_steps=8",
        "federation.local_steps=8",
        "data.max_train_windows=128",
    ]


def test_side_by_side_gives_levels_and_paired_differences_per_multiple(sweep, pq):
    table = sweep.side_by_side({1: result(pq, 0.5), 4: result(pq, 2.0)}, "wiki-lang")
    x1, x4 = table["multiples"]["1"], table["multiples"]["4"]
    assert (x1["iterations"], x4["iterations"]) == (8, 32)
    assert x1["levels"]["local"]["mean"] == pytest.approx(31.0)
    # validation − fedavg per seed: -0.5, -0.5, -1.5 (x1); -2, -2, -3 (x4)
    assert x1["paired"]["fedavg"]["by_seed"] == {"0": -0.5, "1": -0.5, "2": -1.5}
    assert x4["paired"]["fedavg"]["summary"]["mean"] == pytest.approx(-7 / 3)
    assert x4["paired"]["local"]["summary"]["mean"] == pytest.approx(-10 / 3)
    md = sweep.markdown(table)
    assert "| x4 | 32 | [0, 1, 2] | 31.00 | 30.00 | 27.67 |" in md


def test_a_multiple_without_a_seed_finished_by_every_strategy_is_left_out(sweep, pq):
    partial = result(pq, 1.0)
    partial["settings"]["wiki-lang"]["strategies"]["local"]["summary"] = None
    table = sweep.side_by_side(
        {1: result(pq, 1.0), 8: partial, 16: result(pq, 1.0, setting="other")}, "wiki-lang"
    )
    assert list(table["multiples"]) == ["1"]


def test_the_plot_waits_for_a_finished_multiple(sweep, pq, tmp_path):
    empty = sweep.side_by_side({}, "wiki-lang")
    sweep.plot(empty, tmp_path / "none.png")  # log scale with no point would raise
    assert not (tmp_path / "none.png").exists()
    sweep.plot(
        sweep.side_by_side({1: result(pq, 0.5), 4: result(pq, 2.0)}, "wiki-lang"), tmp_path / "two.png"
    )
    assert (tmp_path / "two.png").is_file()
