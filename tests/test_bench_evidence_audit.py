"""bench/evidence_audit.py (not run here: it trains a model per seed): its summary over seeds and table.
Synthetic per-seed rows: no model, seconds."""

from pathlib import Path

import pytest
from tests.conftest import load_bench_script

from cotune.algorithms.privacy import epsilon_spent

BENCH = Path(__file__).resolve().parents[1] / "bench" / "evidence_audit.py"


@pytest.fixture(scope="module")
def bench():
    return load_bench_script(BENCH, "evidence_audit_bench")


def _row(auc, tpr, rank=True):
    figures = {"auc": auc, "tpr_at_1pct_fpr": tpr}
    return {"loss": figures, "rank": dict(figures) if rank else None}


def test_each_level_is_summarised_over_seeds_with_the_evidences_epsilon(bench):
    per_seed = {
        "adapter": [_row(0.9, 0.5, rank=False), _row(1.0, 0.7, rank=False)],
        "unprotected": [_row(0.9, 0.4), _row(0.95, 0.6)],
        "sigma_e=1": [_row(0.5, 0.0), _row(0.6, 0.1)],
    }
    levels = bench.summarise(per_seed, rounds=3)
    assert levels["adapter"]["rank"] is None and "epsilon" not in levels["unprotected"]
    assert levels["sigma_e=1"]["epsilon"] == pytest.approx(epsilon_spent(1.0, 1.0, 3, 1e-5))
    assert levels["sigma_e=1"]["loss"]["auc"]["mean"] == pytest.approx(0.55)
    assert levels["unprotected"]["rank"]["tpr_at_1pct_fpr"]["mean"] == pytest.approx(0.5)
    text = bench.markdown(
        {
            "config": "c.yaml",
            "seeds": [0, 1],
            "clip": 1.0,
            "rounds": 3,
            "max_examples": 16,
            "levels": levels,
            "machine": "m",
            "commit": "abc",
            "command": "python bench/evidence_audit.py",
        }
    )
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| adapter", "| unprotected", "| sigma_e=1"]
    assert rows[0].endswith("| — | — |") and f"| {levels['sigma_e=1']['epsilon']:.3g} |" in rows[2]
