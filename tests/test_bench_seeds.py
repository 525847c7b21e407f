"""bench/fedcollm_quality.py keeps the seeds its results file records when their runs are gone, so a sweep
split over sessions (fresh clones) adds up to one table, and never mixes budgets in one mean."""

from pathlib import Path

from tests.conftest import load_bench_script

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fedcollm_quality.py"


def bench_module():
    return load_bench_script(BENCH, "fedcollm_quality_bench")


def figures(seed: int, lr: float = 1e-3, accuracy: float = 0.5) -> dict:
    config = {"train": {"lr": lr}, "run": {"seed": seed, "name": f"n{seed}", "out_dir": "runs", "threads": 1}}
    return {"config": config, "accuracy": {"slm_fedcollm": accuracy}}


def test_recorded_seeds_without_runs_are_kept_when_only_the_seed_differs():
    bench = bench_module()
    previous = {"per_seed": {"0": figures(0, accuracy=0.74), "1": figures(1, accuracy=0.1)}}
    done = {"1": figures(1, accuracy=0.7)}
    carried = bench.carried_seeds(previous, done)
    assert list(carried) == ["0"]  # seed 1 ran here: this run's figures replace the recorded ones
    assert carried["0"]["accuracy"]["slm_fedcollm"] == 0.74
    split = figures(2)  # its variants ran as separate invocations
    split["config"]["run"]["compare"] = ["zero_shot"]
    assert list(bench.carried_seeds({"per_seed": {"0": figures(0)}}, {"2": split})) == ["0"]


def test_recorded_seeds_of_another_budget_are_dropped():
    bench = bench_module()
    previous = {"per_seed": {"0": figures(0, lr=1e-4)}}
    assert bench.carried_seeds(previous, {"1": figures(1)}) == {}
    other_threads = figures(0)
    other_threads["config"]["run"]["threads"] = 2
    assert bench.carried_seeds({"per_seed": {"0": other_threads}}, {"1": figures(1)}) == {}


def test_nothing_is_carried_without_a_run_of_this_invocation():
    bench = bench_module()
    assert bench.carried_seeds({"per_seed": {"0": figures(0)}}, {}) == {}


def test_a_seed_run_before_the_control_existed_runs_the_control_alone(tmp_path):
    """Seeds recorded without fedavg_ft (the lambda = 0 control) get it added, not rerun whole, and the
    FedCoLLM − control pair counts only the seeds that have both figures."""
    import json

    import pytest

    bench = bench_module()
    out = tmp_path / "run"
    end = json.dumps({"type": "run", "event": "end"}) + "\n"
    for d in bench.dirs_for(out):
        d.mkdir()
        if not d.name.endswith(".fedavg_ft"):
            (d / "metrics.jsonl").write_text(end)
    assert bench.seed_state(out) == "control"
    (out.with_name("run.fedavg_ft") / "metrics.jsonl").write_text(end)
    assert bench.seed_state(out) == "done"
    done = {
        "0": {"accuracy": {"slm_fedcollm": 0.70, "slm_fedavg": 0.60}},
        "1": {"accuracy": {"slm_fedcollm": 0.80, "slm_fedavg": 0.75, "slm_fedavg_ft": 0.78}},
    }
    control = bench.pair(done, "accuracy", "slm_fedcollm", "slm_fedavg_ft")
    assert control.by_seed == {"1": pytest.approx(0.02)} and control.summary.se is None
    fedavg = bench.pair(done, "accuracy", "slm_fedcollm", "slm_fedavg")
    assert fedavg.summary.mean == pytest.approx(0.075) and fedavg.summary.n == 2
    assert bench.pair(done, "accuracy", "slm_fedavg_ft", "slm_fedavg").summary.n == 1
    json_out = bench.mc_json(done, 200, {})
    assert json_out["fedcollm_minus_control_slm"]["by_seed"] == [pytest.approx(0.02)]
    # the public labels' share: control − FedAvg on the seeds that have both (0.78 − 0.75)
    assert json_out["control_minus_fedavg_slm"]["by_seed"] == [pytest.approx(0.03)]
