"""bench/lambda_sweep.py on hand-written run directories (seconds): λ is chosen per seed by the SLM's kept
server-validation score in the final round — never by test —, and the chosen λ's test accuracy is paired
by seed against FedAvg, the λ = 0 control and λ = 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import load_bench_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_bench_script(ROOT / "bench" / "lambda_sweep.py", "lambda_sweep_bench")


def write_run(
    d: Path, algorithm: str, test_acc: float, val: list[tuple[int, float, float]], kept: int | None
):
    """A FedCoLLM-family run of 2 rounds: its final SLM test accuracy, and its final round's SLM validation
    scores (step, accuracy, loss) with the step its distillation kept (None: the last)."""
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(
        f"algorithm: {algorithm}\nmodel: {{name: tiny}}\nfederation: {{rounds: 2}}\n"
    )
    distill = {"type": "distill", "round": 2, "step": 4, "slm_ce": 1.0, "slm_kd": 0.0, "llm_ce": 1.0}
    distill |= {"llm_kd": 0.0, "teacher_bytes": 0, "topk": None, "wall_s": 1.0, "slm_kept": kept}
    earlier = {"type": "distill_val", "round": 1, "model": "slm", "step": 0, "acc": 0.99, "nll": 0.1, "n": 10}
    final = [
        {"type": "distill_val", "round": 2, "model": "slm", "step": s, "acc": a, "nll": nll, "n": 10}
        for s, a, nll in val
    ]
    server_steps = [earlier, *final, distill] if val else []  # FedAvg has none
    lines = [
        {"type": "run", "event": "start", "algorithm": algorithm},
        {"type": "mc", "round": 0, "model": "slm", "client": None, "acc": 0.2},
        *server_steps,
        {"type": "mc", "round": 2, "model": "slm", "client": None, "acc": test_acc},
        {"type": "run", "event": "end"},
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def make_seed(root: Path, seed: int, lam1_test: float) -> None:
    """λ = 2 has the best test accuracy on every seed, but λ = 1 the best kept validation score: the sweep
    must choose λ = 1. Round 1's validation (0.99) is not the final round's and must not count."""
    s = root / f"seed-{seed}"
    write_run(s / "fedavg", "fedavg", 0.40, [], None)
    write_run(s / "lam-0", "fedavg_ft", 0.45, [(0, 0.50, 1.0), (4, 0.55, 0.9)], None)  # kept: the last
    write_run(s / "lam-1", "fedcollm", lam1_test, [(0, 0.50, 1.0), (2, 0.70, 0.8), (4, 0.60, 0.7)], 2)
    # λ = 2: its last step scores 0.70 too but with a higher loss; it kept step 4 (0.65 would lose anyway)
    write_run(s / "lam-2", "fedcollm", 0.90, [(0, 0.50, 1.0), (4, 0.70, 0.85)], 4)


def test_lambda_is_chosen_on_validation_and_paired_by_seed(bench, tmp_path):
    for seed, lam1_test in ((0, 0.50), (1, 0.60)):
        make_seed(tmp_path, seed, lam1_test)
    per_seed = bench.collect(tmp_path, [0, 1], [1.0, 2.0])
    assert {s: per_seed[s]["chosen"]["lam"] for s in ("0", "1")} == {"0": 1.0, "1": 1.0}
    assert per_seed["0"]["lam-1"]["val"] == (0.70, 0.8)  # the kept step's score, not the last step's
    assert per_seed["0"]["lam-0"]["val"] == (0.55, 0.9) and per_seed["0"]["fedavg"]["val"] is None
    result, text = bench.report(per_seed, [1.0, 2.0], 100.0, "accuracy (%)")
    vs_fedavg = result["paired"]["chosen λ − FedAvg"]
    assert vs_fedavg["by_seed"] == {0: pytest.approx(0.10), 1: pytest.approx(0.20)}
    assert vs_fedavg["summary"]["mean"] == pytest.approx(0.15)
    assert vs_fedavg["summary"]["se"] == pytest.approx(0.05)  # sd 0.0707 / sqrt(2)
    # 1 df: t(0.975) = 12.706, so 0.15 ± 0.635 covers 0
    assert vs_fedavg["summary"]["low"] == pytest.approx(0.15 - 12.7062 * 0.05, abs=1e-4)
    assert vs_fedavg["summary"]["verdict"] == "not significant"
    assert result["paired"]["chosen λ − λ = 1"]["by_seed"] == {0: 0.0, 1: 0.0}
    assert "| λ chosen on validation | 50.00 | 60.00 | 55.00 ± 5.00 |" in text
    assert "seed 0: λ = 1, seed 1: λ = 1" in text


def test_a_seed_with_a_missing_variant_chooses_nothing(bench, tmp_path):
    """A λ still running (no end record) leaves its seed without a choice, not one among the others."""
    make_seed(tmp_path, 0, 0.5)
    metrics = tmp_path / "seed-0" / "lam-2" / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-1]))  # killed before its end
    per_seed = bench.collect(tmp_path, [0], [1.0, 2.0])
    assert "chosen" not in per_seed["0"] and "lam-2" not in per_seed["0"]


def test_variants_are_fedavg_the_control_and_fedcollm_per_lambda(bench):
    assert bench.variants([0.5, 1.0]) == {
        "fedavg": ("fedavg", None),
        "lam-0": ("fedavg_ft", 0.0),
        "lam-0.5": ("fedcollm", 0.5),
        "lam-1": ("fedcollm", 1.0),
    }
