"""FedCoLLM distillation losses checked against hand computations and on a tiny LoRA model pair."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from cotune.algorithms.distillation import (
    DistillLoss,
    distillation_loss,
    kd_kl,
    kd_kl_from_topk,
    shift_for_causal_lm,
    supervised_mask,
    task_ce,
    teacher_topk,
)
from cotune.config.schema import TinyModelConfig
from cotune.models.tiny import build_tiny_model


def _one_token(values: list[float]) -> torch.Tensor:
    """Logits of shape (1, 1, V) for a single supervised token."""
    return torch.tensor([[values]], dtype=torch.float32)


def _softmax(xs: list[float]) -> list[float]:
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)


ONE = torch.ones(1, 1, dtype=torch.bool)
IGN = -100


def test_kl_matches_hand_computation_and_direction() -> None:
    teacher, student = [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    p_t, p_s = _softmax(teacher), _softmax(student)
    expected = _kl(p_t, p_s)
    reverse = _kl(p_s, p_t)
    assert abs(expected - reverse) > 0.05  # 0.779 vs 0.840: the two directions really differ for these logits

    got = kd_kl(_one_token(student), _one_token(teacher), ONE)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(expected, rel=1e-6)
    swapped = kd_kl(_one_token(teacher), _one_token(student), ONE)
    assert swapped.item() == pytest.approx(reverse, rel=1e-6)
    assert swapped.item() != pytest.approx(got.item(), rel=1e-3)


def test_kl_is_zero_for_identical_distributions() -> None:
    logits = torch.randn(2, 3, 7)
    assert kd_kl(logits, logits + 5.0, torch.ones(2, 3, dtype=torch.bool)).item() == pytest.approx(
        0, abs=1e-6
    )


def test_temperature_softens_both_and_scales_by_t_squared() -> None:
    teacher, student = [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    expected = 4.0 * _kl(_softmax([x / 2 for x in teacher]), _softmax([x / 2 for x in student]))
    got = kd_kl(_one_token(student), _one_token(teacher), ONE, temperature=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_topk_renormalises_teacher_and_gathers_full_student_log_softmax() -> None:
    teacher, student = [3.0, 1.0, 0.5, 2.0], [0.2, 1.5, -1.0, 0.7]
    # teacher's two largest logits are at indices 0 (3.0) and 3 (2.0)
    z_t = math.exp(3.0) + math.exp(2.0)
    p_t = {0: math.exp(3.0) / z_t, 3: math.exp(2.0) / z_t}
    z_s = sum(math.exp(x) for x in student)  # full-vocabulary student normaliser
    log_p_s = {i: student[i] - math.log(z_s) for i in p_t}
    expected = sum(p * (math.log(p) - log_p_s[i]) for i, p in p_t.items())

    got = kd_kl(_one_token(student), _one_token(teacher), ONE, topk=2)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    full = kd_kl(_one_token(student), _one_token(teacher), ONE)
    assert got.item() != pytest.approx(full.item(), rel=1e-3)


def test_topk_with_temperature_matches_hand_computation() -> None:
    teacher, student = [3.0, 1.0, 0.5, 2.0], [0.2, 1.5, -1.0, 0.7]
    t = 2.0
    z_t = math.exp(3.0 / t) + math.exp(2.0 / t)
    p_t = {0: math.exp(3.0 / t) / z_t, 3: math.exp(2.0 / t) / z_t}
    z_s = sum(math.exp(x / t) for x in student)
    expected = t**2 * sum(p * (math.log(p) - (student[i] / t - math.log(z_s))) for i, p in p_t.items())
    got = kd_kl(_one_token(student), _one_token(teacher), ONE, temperature=t, topk=2)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_topk_at_least_vocab_is_the_full_kl() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    full = kd_kl(s, t, mask)
    torch.testing.assert_close(kd_kl(s, t, mask, topk=6), full)
    torch.testing.assert_close(kd_kl(s, t, mask, topk=100), full)


def test_stored_topk_gives_the_same_kl_as_live_teacher() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3
    values, indices = teacher_topk(t, 4)
    assert values.shape == indices.shape == (2, 5, 4)
    assert indices.dtype == torch.int64
    torch.testing.assert_close(values, t.topk(4, dim=-1).values)
    torch.testing.assert_close(
        kd_kl_from_topk(s, values, indices, mask, temperature=1.5), kd_kl(s, t, mask, 1.5, topk=4)
    )


def test_unsupervised_positions_are_ignored_and_mean_is_over_supervised_tokens() -> None:
    rows_t = [[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [5.0, -5.0, 0.0]]
    rows_s = [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [-5.0, 5.0, 0.0]]
    teacher = torch.tensor([rows_t])
    student = torch.tensor([rows_s])
    mask = torch.tensor([[True, True, False]])
    expected = (
        _kl(_softmax(rows_t[0]), _softmax(rows_s[0])) + _kl(_softmax(rows_t[1]), _softmax(rows_s[1]))
    ) / 2
    assert kd_kl(student, teacher, mask).item() == pytest.approx(expected, rel=1e-6)

    # anything at the unsupervised position, even inf/nan, leaves the value unchanged
    student2, teacher2 = student.clone(), teacher.clone()
    student2[0, 2] = torch.tensor([100.0, -100.0, float("nan")])
    teacher2[0, 2] = torch.tensor([float("-inf"), 7.0, 1.0])
    assert kd_kl(student2, teacher2, mask).item() == pytest.approx(expected, rel=1e-6)


def test_causal_shift_label_at_t_is_predicted_by_logits_at_t_minus_1() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 4, 5, generator=g)
    labels = torch.tensor([[IGN, IGN, 3, IGN]])
    shifted_logits, shifted_labels = shift_for_causal_lm(logits, labels)
    assert shifted_logits.shape == (1, 3, 5) and shifted_labels.tolist() == [[IGN, 3, IGN]]
    assert supervised_mask(shifted_labels).tolist() == [[False, True, False]]
    # the only supervised label (3 at t=2) is predicted by the logits at t=1
    expected = -F.log_softmax(logits[0, 1], dim=-1)[3]
    torch.testing.assert_close(task_ce(logits, labels), expected)

    teacher = torch.randn(1, 4, 5, generator=g)
    out = distillation_loss(logits, teacher, labels)
    torch.testing.assert_close(out.kd, kd_kl(logits[:, 1:2], teacher[:, 1:2], ONE))
    # changing the logits at every position but t=1 changes neither term
    logits2, teacher2 = logits.clone(), teacher.clone()
    for t in (0, 2, 3):
        logits2[0, t] = torch.randn(5, generator=g)
        teacher2[0, t] = torch.randn(5, generator=g)
    out2 = distillation_loss(logits2, teacher2, labels)
    torch.testing.assert_close(out2.ce, out.ce)
    torch.testing.assert_close(out2.kd, out.kd)


def test_gradients_reach_the_student_only() -> None:
    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 6, 9, generator=g).requires_grad_(True)
    teacher = torch.randn(2, 6, 9, generator=g).requires_grad_(True)
    labels = torch.randint(0, 9, (2, 6), generator=g)
    labels[:, :2] = -100
    for topk in (None, 3):
        student.grad = None
        kd_kl(student, teacher, torch.ones(2, 6, dtype=torch.bool), topk=topk).backward()
        assert student.grad is not None and student.grad.abs().sum() > 0
        assert teacher.grad is None
        student.grad = None
        distillation_loss(student, teacher, labels, lam=0.5, temperature=2.0, topk=topk).total.backward()
        assert student.grad is not None and student.grad.abs().sum() > 0
        assert teacher.grad is None
        # prompt positions (logits at t=0 predict label at t=1, which is -100) get no gradient
        assert torch.all(student.grad[:, 0] == 0)


def test_empty_mask_gives_zero_with_a_graph() -> None:
    student = torch.randn(1, 3, 4, requires_grad=True)
    teacher = torch.randn(1, 3, 4)
    for topk in (None, 2):
        kd = kd_kl(student, teacher, torch.zeros(1, 3, dtype=torch.bool), topk=topk)
        assert kd.item() == 0.0 and kd.requires_grad
    out = distillation_loss(student, teacher, torch.full((1, 3), -100))
    assert out.total.item() == 0.0 and not torch.isnan(out.ce)
    out.total.backward()
    assert student.grad is not None and torch.all(student.grad == 0)


def test_lam_zero_is_task_ce_and_ce_matches_torch() -> None:
    g = torch.Generator().manual_seed(4)
    student = torch.randn(3, 7, 10, generator=g)
    teacher = torch.randn(3, 7, 10, generator=g)
    labels = torch.randint(0, 10, (3, 7), generator=g)
    labels[0, :4] = -100
    labels[1, 5:] = -100
    out = distillation_loss(student, teacher, labels, lam=0.0)
    assert isinstance(out, DistillLoss)
    torch.testing.assert_close(out.total, task_ce(student, labels))
    reference = F.cross_entropy(student[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.ce, reference)
    assert out.kd.item() > 0
    lam = 0.7
    out2 = distillation_loss(student, teacher, labels, lam=lam)
    torch.testing.assert_close(out2.total, out2.ce + lam * out2.kd)


def test_vocab_size_truncates_both_padded_logits() -> None:
    g = torch.Generator().manual_seed(5)
    student = torch.randn(2, 5, 8, generator=g)  # lm_head padded to 8
    teacher = torch.randn(2, 5, 6, generator=g)  # lm_head padded to 6; tokenizer has 5
    labels = torch.randint(0, 5, (2, 5), generator=g)
    with pytest.raises(ValueError, match="vocab_size"):
        distillation_loss(student, teacher, labels)
    out = distillation_loss(student, teacher, labels, vocab_size=5, topk=3)
    ref = distillation_loss(student[..., :5], teacher[..., :5], labels, topk=3)
    torch.testing.assert_close(out.total, ref.total)
    torch.testing.assert_close(out.kd, ref.kd)
    with pytest.raises(ValueError, match="vocab_size"):
        distillation_loss(student, teacher, labels, vocab_size=7)
    bad = labels.clone()
    bad[0, 3] = 5
    with pytest.raises(ValueError, match="vocab_size"):
        distillation_loss(student, teacher, bad, vocab_size=5)


def test_half_precision_logits_are_computed_in_float32() -> None:
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(2, 4, 50, generator=g), torch.randn(2, 4, 50, generator=g)
    labels = torch.randint(0, 50, (2, 4), generator=g)
    out = distillation_loss(s.bfloat16(), t.bfloat16(), labels, topk=8)
    ref = distillation_loss(s.bfloat16().float(), t.bfloat16().float(), labels, topk=8)
    assert out.total.dtype == out.ce.dtype == out.kd.dtype == torch.float32
    torch.testing.assert_close(out.total, ref.total)


def test_bad_arguments_are_rejected() -> None:
    s = torch.randn(1, 3, 4)
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="temperature"):
        kd_kl(s, s, mask, temperature=0.0)
    with pytest.raises(ValueError, match="topk"):
        kd_kl(s, s, mask, topk=0)
    with pytest.raises(ValueError, match="same shape"):
        kd_kl(s, torch.randn(1, 3, 5), mask)
    with pytest.raises(ValueError, match="mask"):
        kd_kl(s, s, mask.long())
    with pytest.raises(ValueError, match="lam"):
        distillation_loss(s, s, torch.zeros(1, 3, dtype=torch.long), lam=-1.0)
    with pytest.raises(ValueError, match="labels"):
        task_ce(s, torch.zeros(1, 4, dtype=torch.long))


def _lora_model(hidden: int, seed: int, adapter_seed: int) -> torch.nn.Module:
    cfg = TinyModelConfig(
        hidden_size=hidden, num_layers=1, num_heads=2, intermediate_size=2 * hidden, seed=seed
    )
    base = build_tiny_model(cfg, 258)
    lora = LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )  # random A and B: the adapter changes the output, so a wrong update would show
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(adapter_seed)
        return get_peft_model(base, lora)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_one_step_on_tiny_models_updates_only_the_student_adapter() -> None:
    student = _lora_model(hidden=16, seed=0, adapter_seed=10)  # the SLM g
    teacher = _lora_model(hidden=32, seed=1, adapter_seed=11)  # the LLM f, a different size
    before_s, before_t = _snapshot(student), _snapshot(teacher)
    # both adapters are trainable and both sit in the optimizer: only the detach keeps f fixed
    trainable = [p for m in (student, teacher) for p in m.parameters() if p.requires_grad]
    assert any("lora_" in n and p.requires_grad for n, p in teacher.named_parameters())
    opt = torch.optim.SGD(trainable, lr=0.5)

    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, 256, (2, 12), generator=g)
    labels = input_ids.clone()
    labels[:, :5] = -100  # the prompt
    out = distillation_loss(
        student(input_ids=input_ids).logits,
        teacher(input_ids=input_ids).logits,  # with grad enabled on purpose
        labels,
        lam=1.0,
        temperature=2.0,
        topk=16,
        vocab_size=258,
    )
    assert torch.isfinite(out.total) and out.kd.item() > 0
    opt.zero_grad()
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()

    changed = [n for n, p in student.named_parameters() if not torch.equal(p.detach(), before_s[n])]
    assert changed and all("lora_" in n for n in changed)
    student_lora = [n for n, p in student.named_parameters() if "lora_" in n]
    assert set(changed) == set(student_lora)  # every student adapter tensor moved
    for name, p in teacher.named_parameters():
        assert torch.equal(p.detach(), before_t[name]), f"teacher parameter {name} changed"
