"""bench/privacy_audit.py (not run here: it trains SmolLM2 for hours): the noise multiplier of each target
epsilon, the runs of each DP level, and the collection of audits into per-seed client means. Synthetic run
directories: no model, seconds."""

import json
from pathlib import Path

import pytest
from tests.conftest import load_bench_script

from cotune.algorithms.privacy import epsilon_spent

BENCH = Path(__file__).resolve().parents[1] / "bench" / "privacy_audit.py"


@pytest.fixture(scope="module")
def bench():
    return load_bench_script(BENCH, "privacy_audit_bench")


@pytest.mark.parametrize("epsilon", [1.0, 4.0, 8.0])
def test_the_noise_of_each_target_epsilon_spends_that_epsilon(bench, epsilon):
    sigma = bench.sigma_for(epsilon, 3, 1e-5)
    assert epsilon_spent(sigma, 1.0, 3, 1e-5) == pytest.approx(epsilon, rel=1e-3)


def test_each_dp_level_runs_the_trust_strategies_and_local_only_without_dp(bench, tmp_path):
    assert list(bench.run_dirs(tmp_path, "none", 0)) == ["validation", "local", "fedavg", "prediction"]
    assert list(bench.run_dirs(tmp_path, "eps4", 1)) == ["validation", "fedavg", "prediction"]
    assert bench.run_dirs(tmp_path, "eps4", 1)["fedavg"] == tmp_path / "eps4" / "s1.fedavg"
    (tmp_path / "clip_norm.json").write_text(json.dumps({"clip_norm": 0.25}))
    extra = bench.dp_overrides(4.0, 1, tmp_path, ["federation.rounds=3"])
    assert "privacy.clip_norm=0.25" in extra and "privacy.seed=1" in extra
    sigma = float(next(x for x in extra if x.startswith("privacy.noise_multiplier=")).split("=")[1])
    assert epsilon_spent(sigma, 1.0, 3, 1e-5) == pytest.approx(4.0, rel=1e-3)


def write_run(d: Path, ppl: list[float], aucs: list[float], epsilon: float | None) -> None:
    """A finished personalized run with its audit.json."""
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("algorithm: personalized\nmodel: {name: tiny}\nfederation: {clients: 2}\n")
    lines = [{"type": "run", "event": "start", "strategy": "x", "clients": 2}]
    lines += [{"type": "eval", "round": 2, "client": c, "ppl": p, "split": "test"} for c, p in enumerate(ppl)]
    if epsilon is not None:
        lines.append(
            {
                "type": "privacy",
                "event": "spent",
                "round": 2,
                "epsilon": epsilon,
                "delta": 1e-5,
                "noise_multiplier": 1.0,
                "clip_norm": 0.1,
                "sample_rate": 1.0,
                "noise": "per_upload",
            }
        )
    lines.append({"type": "run", "event": "end"})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))
    attack = [{"auc": a, "tpr_at_1pct_fpr": a / 10} for a in aucs]
    clients = [
        {"client": c, "members": 8, "nonmembers": 8, "loss": x, "calibrated": x} for c, x in enumerate(attack)
    ]
    (d / "audit.json").write_text(json.dumps({"clients": clients}))


def test_collect_averages_clients_within_a_seed_then_over_seeds(bench, tmp_path):
    for seed, shift in ((0, 0.0), (1, 0.1)):
        for d in bench.run_dirs(tmp_path, "eps4", seed).values():
            write_run(d, [10.0, 20.0], [0.5 + shift, 0.7 + shift], 3.9)
    bench.run_dirs(tmp_path, "eps4", 2)["validation"].mkdir(parents=True)  # seed 2 unfinished: left out
    result = bench.collect([4.0], [0, 1, 2], tmp_path)
    level = result["levels"]["eps4"]
    assert level["seeds"] == [0, 1]
    summary = level["strategies"]["fedavg"]["summary"]
    assert summary["loss_auc"]["mean"] == pytest.approx(0.65)  # seed means 0.6 and 0.7
    assert summary["calibrated_tpr_at_1pct_fpr"]["mean"] == pytest.approx(0.065)
    assert summary["test_ppl"]["mean"] == pytest.approx(15.0)
    assert summary["epsilon"]["mean"] == pytest.approx(3.9)
    assert "| eps4 | fedavg | 3.90" in bench.markdown(
        {**result, "commit": "c", "machine": "m", "command": "x"}
    )
