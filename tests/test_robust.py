"""Pure defences: update screening, robust aggregators, DP clipping/noise/accounting, attacks."""

from __future__ import annotations

import math

import pytest
import torch

from cotune.algorithms.aggregation import weighted_average
from cotune.algorithms.personalized import TrustEvidence, aggregate
from cotune.algorithms.privacy import (
    add_gaussian_noise,
    clip_update,
    clip_uploads,
    epsilon_spent,
    noise_std,
)
from cotune.algorithms.robust import (
    check_update,
    coordinate_median,
    robust_average,
    screen_updates,
    state_norm,
    trimmed_mean,
    update_delta,
)
from cotune.config.schema import StrategyConfig
from cotune.runtime.simulated import attack_upload, garbage_tokens


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "l.lora_A.weight": torch.randn(4, 6, generator=g) * scale,
        "l.lora_B.weight": torch.randn(6, 4, generator=g) * scale,
    }


# ---- screening -------------------------------------------------------------------------------------


def test_a_clean_update_passes_and_every_kind_of_bad_update_is_named():
    ref = _state(0)
    ok = {k: v + 0.01 for k, v in ref.items()}
    assert check_update(ok, ref) is None

    nan = {**ok, "l.lora_A.weight": ok["l.lora_A.weight"].clone()}
    nan["l.lora_A.weight"][0, 0] = float("nan")
    assert "non-finite" in check_update(nan, ref) and "lora_A" in check_update(nan, ref)
    inf = {**ok, "l.lora_B.weight": torch.full((6, 4), float("inf"))}
    assert "24 non-finite" in check_update(inf, ref)
    assert "unexpected key 'x'" in check_update({**ok, "x": torch.zeros(1)}, ref)
    assert "missing key 'l.lora_B.weight'" in check_update({"l.lora_A.weight": ok["l.lora_A.weight"]}, ref)
    wrong_shape = {**ok, "l.lora_A.weight": torch.zeros(4, 5)}
    assert "shape (4, 5), expected (4, 6)" in check_update(wrong_shape, ref)
    ints = {**ok, "l.lora_A.weight": torch.zeros(4, 6, dtype=torch.int64)}
    assert "non-floating" in check_update(ints, ref)


def test_the_norm_bound_applies_to_the_update_not_the_adapter():
    ref = _state(0, scale=100.0)  # a large adapter: its own norm is irrelevant
    delta = {k: torch.full_like(v, 0.5) for k, v in ref.items()}  # 48 entries of 0.5: norm sqrt(12)
    upload = {k: ref[k] + delta[k] for k in ref}
    norm = state_norm(update_delta(upload, ref))
    assert norm == pytest.approx(math.sqrt(12), rel=1e-5)
    assert check_update(upload, ref, max_norm=norm * 1.01) is None
    reason = check_update(upload, ref, max_norm=norm * 0.99)
    assert reason is not None and "exceeds max_update_norm" in reason


def test_screen_updates_reports_positions_and_reasons():
    ref = _state(0)
    good = {k: v + 0.1 for k, v in ref.items()}
    big = {k: v + 10.0 for k, v in ref.items()}
    bad = {k: torch.full_like(v, float("nan")) for k, v in ref.items()}
    accepted, rejected = screen_updates([good, big, bad, good], [ref] * 4, max_norm=5.0)
    assert accepted == [0, 3]
    assert [i for i, _ in rejected] == [1, 2]
    assert "norm" in rejected[0][1] and "non-finite" in rejected[1][1]


# ---- robust aggregators ----------------------------------------------------------------------------


def test_coordinate_median_matches_torch_and_ignores_one_huge_outlier():
    states = [_state(i) for i in range(5)]
    med = coordinate_median(states)
    for k in states[0]:
        torch.testing.assert_close(med[k], torch.stack([s[k] for s in states]).median(0).values)
    poisoned = [*states[:4], {k: v * 1e6 for k, v in states[4].items()}]
    honest_max = {k: torch.stack([s[k] for s in states[:4]]).abs().amax(0) for k in states[0]}
    robust = coordinate_median(poisoned)
    assert all((robust[k].abs() <= honest_max[k] + 1e-6).all() for k in robust)
    mean = weighted_average(poisoned)
    assert any((mean[k].abs() > 1e3).any() for k in mean)  # the plain mean is dragged away


def test_median_of_an_even_count_averages_the_two_middle_values():
    states = [{"w": torch.tensor([float(x)])} for x in (1, 2, 10, 20)]
    assert coordinate_median(states)["w"].item() == 6.0


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    states = [{"w": torch.tensor([float(x), float(-x)])} for x in (1, 2, 3, 100)]
    out = trimmed_mean(states, 0.25)["w"]  # floor(0.25 * 4) = 1 dropped at each end, per coordinate
    torch.testing.assert_close(out, torch.tensor([2.5, -2.5]))
    torch.testing.assert_close(trimmed_mean(states, 0.0)["w"], weighted_average(states)["w"])
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(states, 0.5)


def test_robust_average_dispatches_and_mean_keeps_the_weights():
    states = [_state(i) for i in range(3)]
    w = [1.0, 2.0, 5.0]
    for k, v in robust_average(states, "mean", weights=w).items():
        torch.testing.assert_close(v, weighted_average(states, w)[k])
    assert robust_average(states, "median")["l.lora_A.weight"].shape == (4, 6)
    with pytest.raises(ValueError, match="unknown aggregator"):
        robust_average(states, "mode")  # type: ignore[arg-type]


def test_personalized_fedavg_with_a_robust_aggregator_gives_every_client_the_median():
    states = [_state(i) for i in range(3)]
    cfg = StrategyConfig(name="fedavg")
    trust, mixed = aggregate(cfg, states, TrustEvidence(3), aggregator="median")
    med = coordinate_median(states)
    torch.testing.assert_close(trust, torch.full((3, 3), 1 / 3))
    for m in mixed:
        for k in m:
            torch.testing.assert_close(m[k], med[k])
    # trust-weighted strategies keep their own mixing
    _, local = aggregate(StrategyConfig(name="local"), states, TrustEvidence(3), aggregator="median")
    torch.testing.assert_close(local[1]["l.lora_A.weight"], states[1]["l.lora_A.weight"])


# ---- differential privacy --------------------------------------------------------------------------


def test_clipping_bounds_the_update_norm_and_leaves_small_updates_alone():
    big = {k: v * 50 for k, v in _state(1).items()}
    clipped, norm = clip_update(big, 2.0)
    assert norm == pytest.approx(state_norm(big))
    assert state_norm(clipped) == pytest.approx(2.0, rel=1e-6)
    ratio = clipped["l.lora_A.weight"] / big["l.lora_A.weight"]  # a scaling, not a projection per key
    torch.testing.assert_close(ratio, torch.full_like(ratio, 2.0 / norm))
    small = {k: v * 1e-3 for k, v in _state(1).items()}
    same, _ = clip_update(small, 2.0)
    for k in small:
        torch.testing.assert_close(same[k], small[k])

    ref = _state(0)
    uploads = [{k: ref[k] + big[k] for k in ref}, {k: ref[k] + small[k] for k in ref}]
    sanitized, norms = clip_uploads(uploads, [ref, ref], 2.0)
    assert state_norm(update_delta(sanitized[0], ref)) == pytest.approx(2.0, rel=1e-5)
    assert norms[0] > 2.0 > norms[1]


def test_gaussian_noise_has_the_calibrated_scale():
    clip, sigma, clients = 0.5, 1.3, 4
    std = noise_std(clip, sigma, max_weight=1 / clients)
    assert std == pytest.approx(sigma * clip / clients)
    zero = {"w": torch.zeros(400_000)}
    noised = add_gaussian_noise(zero, std, torch.Generator().manual_seed(0))["w"]
    assert noised.std().item() == pytest.approx(std, rel=0.01)
    assert abs(noised.mean().item()) < 5 * std / math.sqrt(noised.numel())
    again = add_gaussian_noise(zero, std, torch.Generator().manual_seed(0))["w"]
    assert torch.equal(noised, again)  # reproducible with a seeded generator


def test_epsilon_from_the_accountant_is_sane():
    from opacus.accountants import RDPAccountant

    delta = 1e-5
    eps = epsilon_spent(1.0, 1.0, 10, delta)
    acc = RDPAccountant()
    for _ in range(10):
        acc.step(noise_multiplier=1.0, sample_rate=1.0)
    assert eps == pytest.approx(acc.get_epsilon(delta))
    # the classical RDP bound of the Gaussian mechanism: T/(2 s^2) + 2 sqrt(T log(1/delta) / (2 s^2))
    t = 10
    classical = t / 2 + 2 * math.sqrt(t * math.log(1 / delta) / 2)
    assert t / 2 < eps <= classical
    assert epsilon_spent(2.0, 1.0, 10, delta) < eps < epsilon_spent(1.0, 1.0, 20, delta)
    assert epsilon_spent(1.0, 0.1, 10, delta) < eps  # amplification by sampling
    assert epsilon_spent(0.0, 1.0, 10, delta) == math.inf
    assert epsilon_spent(1.0, 1.0, 0, delta) == 0.0


# ---- attacks ---------------------------------------------------------------------------------------


def test_attacks_transform_the_honest_update_as_documented():
    ref = _state(0)
    honest = {k: v + 0.1 * torch.randn_like(v) for k, v in ref.items()}
    delta = update_delta(honest, ref)
    flipped = attack_upload("sign_flip", honest, ref, 2.0)
    scaled = attack_upload("scale", honest, ref, 5.0)
    for k in ref:
        torch.testing.assert_close(flipped[k], ref[k] - 2.0 * delta[k])
        torch.testing.assert_close(scaled[k], ref[k] + 5.0 * delta[k])
    g = torch.Generator().manual_seed(0)
    noisy = attack_upload("noise", honest, ref, 10.0, g)
    for k in ref:
        rms = delta[k].pow(2).mean().sqrt()
        got = (noisy[k] - ref[k]).pow(2).mean().sqrt()
        assert 5 * rms < got < 15 * rms
    assert all(torch.isnan(v).all() for v in attack_upload("nan", honest, ref, 1.0).values())
    assert attack_upload("garbage_data", honest, ref, 1.0)["l.lora_A.weight"].equal(honest["l.lora_A.weight"])


def test_garbage_tokens_respect_the_mask_and_vocabulary():
    ids = torch.arange(12).reshape(2, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    out = garbage_tokens(ids, 1000, torch.Generator().manual_seed(0), mask)
    assert torch.equal(out[0, 3:], ids[0, 3:])  # padding untouched
    assert not torch.equal(out[1], ids[1]) and int(out.max()) < 1000
