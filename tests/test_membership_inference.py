"""Membership-inference metrics against hand-computed values (evaluation/membership_inference.py)."""

from __future__ import annotations

import pytest
import torch

from cotune.evaluation.membership_inference import (
    Losses,
    MembershipAudit,
    calibrated_scores,
    loss_scores,
    roc_auc,
    tpr_at_fpr,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_auc_by_hand_with_a_tie():
    # pairs won by members: 0.9 -> 3, 0.8 -> 3, 0.4 -> 1 win + 1 tie (0.5) = 1.5; 7.5 of 9 pairs
    assert roc_auc(t(0.9, 0.8, 0.4), t(0.7, 0.4, 0.1)) == pytest.approx(7.5 / 9)


def test_auc_extremes():
    assert roc_auc(t(3, 4), t(1, 2)) == 1.0
    assert roc_auc(t(1, 2), t(3, 4)) == 0.0
    assert roc_auc(t(5, 5, 5), t(5, 5)) == 0.5


def test_auc_is_the_pairwise_count():
    gen = torch.Generator().manual_seed(0)
    m = torch.randint(0, 6, (40,), generator=gen).double()  # many ties
    n = torch.randint(0, 5, (30,), generator=gen).double()
    diff = m[:, None] - n[None, :]
    brute = ((diff > 0).double().sum() + 0.5 * (diff == 0).double().sum()) / diff.numel()
    assert roc_auc(m, n) == pytest.approx(float(brute))


def test_tpr_at_fpr_by_hand():
    members, nonmembers = t(0.9, 0.8, 0.4), t(0.7, 0.4, 0.1)
    assert tpr_at_fpr(members, nonmembers, 0.01) == pytest.approx(2 / 3)  # above every non-member
    assert tpr_at_fpr(members, nonmembers, 1 / 3) == pytest.approx(2 / 3)  # 0.4 ties a non-member
    assert tpr_at_fpr(members, nonmembers, 2 / 3) == 1.0
    assert tpr_at_fpr(members, nonmembers, 1.0) == 1.0


def test_tpr_at_one_percent_of_200_nonmembers():
    nonmembers = torch.arange(200).double()  # 2 of them (199, 198) may be flagged at 1% FPR
    members = t(199.5, 198.5, 197.5, 150)
    assert tpr_at_fpr(members, nonmembers) == pytest.approx(3 / 4)  # 197.5 > 197: the 3rd highest


def test_scores_of_both_attacks():
    losses = Losses(target=t(1.0, 2.0), reference=t(3.0, 2.5))
    assert loss_scores(losses).tolist() == [-1.0, -2.0]
    assert calibrated_scores(losses).tolist() == [2.0, 0.5]


def test_audit_leaves_out_unscored_examples():
    members = Losses(target=t(1.0, float("nan"), 1.5), reference=t(3.0, 3.0, 2.0))
    nonmembers = Losses(target=t(2.0, 2.5), reference=t(2.5, 2.6))
    audit = MembershipAudit.of(members, nonmembers)
    assert (audit.members, audit.nonmembers) == (2, 2)
    assert audit.loss.auc == 1.0  # member losses 1.0, 1.5 below 2.0, 2.5
    # member gains 2.0, 0.5 against non-member gains 0.5, 0.1: 2 wins + 1 tie + 1 win = 3.5 of 4 pairs
    assert audit.calibrated.auc == pytest.approx(3.5 / 4)
    assert set(audit.as_dict()) == {"members", "nonmembers", "loss", "calibrated"}


def test_refuses_empty_or_infinite_scores():
    with pytest.raises(ValueError, match="at least one"):
        roc_auc(t(), t(1.0))
    with pytest.raises(ValueError, match="finite"):
        tpr_at_fpr(t(float("inf")), t(1.0))


def test_example_losses_are_each_rows_own_loss():
    """Per row, the mean loss `evaluate_lm` gives that row alone: windows, and padded examples whose
    prompt and padding are not scored (one row with no scored token: NaN)."""
    from cotune.config.schema import TinyModelConfig
    from cotune.data.task_data import EncodedSet
    from cotune.evaluation.lm import IGNORE_INDEX, evaluate_lm, example_losses
    from cotune.models.tiny import build_tiny_model, byte_tokenizer

    torch.manual_seed(0)
    model = build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2), len(byte_tokenizer())
    )
    windows = torch.randint(3, 200, (5, 12))
    rows = torch.tensor([4, 0, 2])
    losses = example_losses(model, windows, rows, batch_size=2)
    for k, row in enumerate(rows.tolist()):
        assert float(losses[k]) == pytest.approx(evaluate_lm(model, windows[row : row + 1], 1).loss, rel=1e-5)

    ids = torch.randint(3, 200, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # the prompt
    labels[1, 7:] = IGNORE_INDEX  # the padding
    labels[2, :] = IGNORE_INDEX  # nothing scored
    examples = EncodedSet(ids, mask, labels)
    losses = example_losses(model, examples, torch.arange(3), batch_size=3)
    for row in (0, 1):
        one = EncodedSet(ids[row : row + 1], mask[row : row + 1], labels[row : row + 1])
        assert float(losses[row]) == pytest.approx(evaluate_lm(model, one, 1).loss, rel=1e-5)
    assert torch.isnan(losses[2])
