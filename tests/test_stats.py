"""reporting/stats.py against hand-computed values (t quantiles from tables: t(0.975; 2) = 4.302653,
t(0.975; 3) = 3.182446)."""

import math

import pytest

from cotune.reporting.stats import paired_difference, seed_means, summarize


def test_summary_of_three_seeds_matches_the_hand_computed_t_interval():
    s = summarize([1.0, 2.0, 3.0])  # mean 2, sample sd 1, se 1/sqrt(3)
    assert s.mean == 2.0 and s.df == 2
    assert s.se == pytest.approx(1 / math.sqrt(3))
    half = 4.302653 / math.sqrt(3)
    assert s.low == pytest.approx(2 - half, abs=1e-6) and s.high == pytest.approx(2 + half, abs=1e-6)
    assert s.significant is False and s.verdict() == "not significant"  # -0.48 to 4.48


def test_paired_difference_covering_zero_is_not_significant():
    p = paired_difference({0: 5.0, 1: 7.0, 2: 6.0, 9: 1.0}, {0: 4.0, 1: 5.0, 2: 6.0})  # seed 9 unpaired
    assert p.by_seed == {0: 1.0, 1: 2.0, 2: 0.0}
    assert p.summary.mean == 1.0
    assert p.summary.low == pytest.approx(1 - 4.302653 / math.sqrt(3), abs=1e-6)
    assert p.summary.significant is False and p.summary.verdict() == "not significant"
    assert "not significant" not in p.summary.text()  # the text is the numbers; the verdict is separate
    assert "95% CI" in p.summary.text()


def test_a_consistent_small_difference_is_significant():
    p = paired_difference(
        {s: 1.0 + d for s, d in enumerate([0.0, 0.1, -0.1, 0.0])}, dict.fromkeys(range(4), 0.0)
    )
    se = math.sqrt(0.02 / 3) / 2
    assert p.summary.se == pytest.approx(se)
    assert p.summary.low == pytest.approx(1 - 3.182446 * se, abs=1e-6)
    assert p.summary.significant is True


def test_one_seed_gives_no_interval_and_says_so():
    s = summarize([0.5])
    assert s.se is None and s.low is None and s.significant is None
    assert s.verdict() == "1 seed: no interval"


def test_clients_are_averaged_within_their_seed_before_any_interval():
    per_client = {0: {0: 10.0, 1: 20.0}, 1: {0: 30.0, 1: 50.0}}
    assert seed_means(per_client) == {0: 15.0, 1: 40.0}
    assert summarize(list(seed_means(per_client).values())).n == 2  # two seeds, not four pairs


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([1.0, math.nan])
    with pytest.raises(ValueError):
        paired_difference({0: 1.0}, {1: 1.0})
