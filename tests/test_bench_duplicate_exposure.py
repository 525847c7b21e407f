"""bench/duplicate_exposure.py: which scored test examples were also trained on, and the exact range of an
accuracy without them (hand-computed; no model, no run)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.conftest import load_bench_script

from cotune.evaluation.multiple_choice import MCExample

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_bench_script(ROOT / "bench" / "duplicate_exposure.py", "duplicate_exposure_test")


def ex(prompt: str) -> MCExample:
    return MCExample(prompt, (" a", " b"), 0)


def test_exposure_counts_prompts_seen_in_training_whitespace_aside(bench):
    public = [ex("alpha  beta"), ex("gamma")]
    clients = [[ex("delta"), ex("eps")], [ex("zeta\n")]]
    test_split = [ex("alpha beta"), ex("zeta"), ex("eta"), ex("eta"), ex("theta")]
    scored = test_split[:4]  # task.max_test_examples cut the split to 4
    e = bench.exposure(public, clients, test_split, scored)
    assert e["scored_test"] == 4 and e["scored_test_in_training"] == 2  # alpha beta (public), zeta (client 1)
    assert e["scored_test_repeated"] == 1  # eta twice
    assert e["duplicated"] == {"public": 1, "client 0": 0, "client 1": 1, "test": 4}
    assert e["examples"] == {"public": 2, "client 0": 2, "client 1": 1, "test": 5}


def test_the_accuracy_without_exposed_examples_is_given_as_its_exact_range(bench):
    # 200 examples, 80% right (160), 7 exposed: 153/193 if all 7 were right, 160/193 if all were wrong
    lo, hi = bench.accuracy_range(0.8, 200, 7)
    assert lo == pytest.approx(153 / 193) and hi == pytest.approx(160 / 193)
    assert bench.accuracy_range(0.8, 200, 0) == (0.8, 0.8)
    assert bench.accuracy_range(1.0, 10, 3) == (1.0, 1.0)  # every example right: all exposed ones too
    lo, hi = bench.difference_range(0.8, 0.75, 200, 7)  # 160 and 150 right
    assert lo == pytest.approx(153 / 193 - 150 / 193) and hi == pytest.approx(160 / 193 - 143 / 193)
    with pytest.raises(ValueError, match="every test example"):
        bench.accuracy_range(0.5, 4, 4)
