"""Losses for FedCoLLM's server-side mutual knowledge distillation (Fan et al. 2024).

On a public labelled set the server alternates two steps between the LLM f (frozen base +
server LoRA ω) and the SLM g (frozen base + LoRA θ), which share a tokenizer:

- SLM step: L_g(θ) = CE(g(x), y) + λ · KL(p_f ‖ p_g), the LLM is the (detached) teacher;
- LLM step: L_f(ω) = CE(f(x), y) + λ · KL(p_g ‖ p_f), the SLM is the (detached) teacher.

Both are :func:`distillation_loss` with the roles swapped. Conventions used throughout:

- Only answer tokens are supervised: ``labels == -100`` marks prompt/padding positions, and
  after the causal shift (logits at t-1 predict the label at t) both the CE and the KL are
  means over the supervised tokens only, so prompt length never dilutes the loss.
- Everything is computed in float32 whatever the logits' dtype: bf16 log-softmax over a 150k
  vocabulary loses enough precision to bias a KL that is often < 0.1 nats.
- The teacher is detached *inside* the KL, so a caller that forgets ``torch.no_grad`` on the
  teacher's forward still cannot push gradients into the teacher.
- Temperature T softens both distributions; the KL is multiplied by T² (Hinton et al.) so its
  gradient scale does not shrink as T grows and λ keeps its meaning across temperatures.
- Rows are selected with the supervision mask *before* any float32 copy or softmax, so memory
  scales with the number of answer tokens, not with batch × sequence length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cotune.evaluation.lm import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "DistillLoss",
    "answer_positions",
    "choice_logits",
    "distillation_loss",
    "kd_kl",
    "kd_kl_choices",
    "kd_kl_from_topk",
    "shift_for_causal_lm",
    "supervised_mask",
    "task_ce",
    "teacher_topk",
]

"""Label value of positions that are not supervised (prompt, padding), as in transformers."""


def _check_logits_labels(logits: Tensor, labels: Tensor) -> None:
    """Fail early with shapes in the message instead of deep inside an indexing op."""
    if logits.ndim != 3:
        raise ValueError(f"logits must be (batch, seq, vocab), got shape {tuple(logits.shape)}")
    if labels.ndim != 2 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must be (batch, seq) = {tuple(logits.shape[:2])}, got shape {tuple(labels.shape)}"
        )


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite positive number, got {temperature}")


def shift_for_causal_lm(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align a causal LM's outputs with its targets: logits at t-1 predict the label at t.

    Returns views ``logits[:, :-1]`` and ``labels[:, 1:]`` (no copy), of sequence length T-1.
    """
    _check_logits_labels(logits, labels)
    return logits[:, :-1, :], labels[:, 1:]


def supervised_mask(labels: Tensor) -> Tensor:
    """Boolean (B, T) mask of the positions that carry a training target (labels != -100)."""
    return labels != IGNORE_INDEX


def _kl_rows(log_p_teacher: Tensor, log_p_student: Tensor) -> Tensor:
    """Σ_v p_t (log p_t − log p_s) per row, with 0 · log 0 = 0 so -inf teacher logits give no NaN."""
    p_teacher = log_p_teacher.exp()
    terms = torch.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), 0.0)
    return terms.sum(dim=-1)


def _student_log_probs(student_rows: Tensor, temperature: float) -> Tensor:
    """Full-vocabulary log_softmax at temperature T, in float32."""
    rows = student_rows.float()
    if temperature != 1.0:
        rows = rows / temperature
    return F.log_softmax(rows, dim=-1)


def _finish_kl(kl_rows: Tensor, temperature: float) -> Tensor:
    """Mean over supervised tokens, then the T² gradient-scale correction."""
    loss = kl_rows.mean()
    if temperature != 1.0:
        loss = loss * (temperature**2)
    return loss


def _check_mask(mask: Tensor, shape: torch.Size) -> None:
    if mask.dtype != torch.bool or mask.shape != shape:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(shape)}, got {mask.dtype} {tuple(mask.shape)}"
        )


def kd_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
    topk: int | None = None,
) -> Tensor:
    """KL(p_teacher ‖ p_student) per token, averaged over the tokens where ``mask`` is True.

    ``student_logits`` and ``teacher_logits`` are already aligned (B, T, V) tensors (shifted
    and vocabulary-truncated by the caller, see :func:`distillation_loss`); ``mask`` is (B, T)
    bool. The teacher is detached here, so gradients can only reach the student.

    With ``topk=k`` (k < V) only the teacher's k largest logits are used, which is what makes
    shipping or caching teacher outputs affordable (k values + k indices per token instead of V
    logits) and avoids a full-vocabulary teacher probability tensor:

    - teacher: p_t = softmax(top-k logits / T), i.e. renormalised over those k tokens, so the
      teacher's tail mass is dropped rather than spread;
    - student: log p_s = full-vocabulary log_softmax(logits / T) gathered at the teacher's top-k
      indices (not renormalised: the student is still penalised only through its probability
      of the teacher's top tokens, and putting mass elsewhere lowers those);
    - KL = Σ_k p_t (log p_t − log p_s).

    ``topk >= V`` is the exact full KL. Returns a float32 scalar; an empty mask gives 0 that is
    still connected to the student's graph, so ``backward()`` works on any batch.
    """
    if student_logits.ndim != 3 or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"student and teacher logits must both be (batch, seq, vocab) of the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    _check_mask(mask, student_logits.shape[:2])
    _check_temperature(temperature)
    if topk is not None and topk < 1:
        raise ValueError(f"topk must be >= 1 or None, got {topk}")
    vocab = student_logits.shape[-1]
    teacher_logits = teacher_logits.detach()
    if topk is not None and topk < vocab:
        values, indices = teacher_topk(teacher_logits, topk)
        return kd_kl_from_topk(student_logits, values, indices, mask, temperature)

    student_rows = student_logits[mask]  # (N, V): only supervised tokens are ever upcast
    if student_rows.shape[0] == 0:
        return student_rows.float().sum()
    log_p_student = _student_log_probs(student_rows, temperature)
    teacher_rows = teacher_logits[mask].float()
    if temperature != 1.0:
        teacher_rows = teacher_rows / temperature
    log_p_teacher = F.log_softmax(teacher_rows, dim=-1)
    return _finish_kl(_kl_rows(log_p_teacher, log_p_student), temperature)


def kd_kl_from_topk(
    student_logits: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """The top-k KL of :func:`kd_kl` from stored teacher outputs (see :func:`teacher_topk`).

    Lets the server (or a client) compute the teacher's top-k once, ship/cache only
    ``(values, indices)`` of shape (B, T, k), and distil from them later without the teacher.
    Inputs are aligned with ``student_logits`` (B, T, V) and ``mask`` (B, T) as in :func:`kd_kl`.
    """
    if student_logits.ndim != 3:
        raise ValueError(f"student logits must be (batch, seq, vocab), got {tuple(student_logits.shape)}")
    if teacher_values.shape != teacher_indices.shape or teacher_values.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"teacher values/indices must both be (batch, seq, k) with (batch, seq) = "
            f"{tuple(student_logits.shape[:2])}, got {tuple(teacher_values.shape)} and "
            f"{tuple(teacher_indices.shape)}"
        )
    _check_mask(mask, student_logits.shape[:2])
    _check_temperature(temperature)
    student_rows = student_logits[mask]
    if student_rows.shape[0] == 0:
        return student_rows.float().sum()
    log_p_student = _student_log_probs(student_rows, temperature).gather(-1, teacher_indices[mask])
    values = teacher_values.detach()[mask].float()
    if temperature != 1.0:
        values = values / temperature
    log_p_teacher = F.log_softmax(values, dim=-1)  # renormalised over the k kept tokens
    return _finish_kl(_kl_rows(log_p_teacher, log_p_student), temperature)


def answer_positions(shifted_labels: Tensor) -> Tensor:
    """(B,): per row, the first supervised position of the shifted labels (the answer's first token)."""
    mask = supervised_mask(shifted_labels)
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every row needs at least one supervised (answer) token")
    return mask.int().argmax(dim=1)


def choice_logits(shifted_logits: Tensor, positions: Tensor, choices: Tensor) -> Tensor:
    """(B, C): each row's logits at its answer position, at its choices' first tokens (-inf where -1)."""
    rows = shifted_logits[torch.arange(len(positions), device=positions.device), positions]
    picked = rows.gather(-1, choices.clamp(min=0)).float()
    return picked.masked_fill(choices < 0, float("-inf"))


def kd_kl_choices(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_teacher ‖ p_student) over each row's choices: both softmaxed over the (B, C) choice logits
    (-inf entries are absent choices), mean over rows, times T². The teacher is detached here."""
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(
            f"choice logits must both be (batch, choices), got {tuple(student.shape)}, {tuple(teacher.shape)}"
        )
    _check_temperature(temperature)
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    p_teacher = log_p_teacher.exp()
    present = torch.isfinite(log_p_teacher)
    terms = torch.where(present, p_teacher * (log_p_teacher - log_p_student), 0.0)
    return _finish_kl(terms.sum(dim=-1), temperature)


def teacher_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The teacher's k largest logits and their vocabulary indices, (…, k) each, detached.

    What to store or send instead of full logits. The values keep the logits' dtype (top-k is
    invariant to the positive temperature scaling applied later); k is clamped to the
    vocabulary size.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    result = torch.topk(logits.detach(), min(k, logits.shape[-1]), dim=-1)
    return result.values, result.indices


def _ce_rows(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Mean CE over the masked (already shifted) positions, in float32; 0 with graph if none."""
    rows = logits[mask].float()
    if rows.shape[0] == 0:
        return rows.sum()
    return F.cross_entropy(rows, labels[mask])


def task_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy on answer tokens only (causal shift inside).

    Equals ``F.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100)`` but upcasts only
    the supervised rows to float32, and returns 0 (not NaN) when a batch has no answer token.
    """
    shifted_logits, shifted_labels = shift_for_causal_lm(logits, labels)
    return _ce_rows(shifted_logits, shifted_labels, supervised_mask(shifted_labels))


@dataclass(frozen=True)
class DistillLoss:
    """One distillation step's loss and its parts (ce and kd kept apart for logging)."""

    total: Tensor
    ce: Tensor
    kd: Tensor


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    lam: float = 1.0,
    temperature: float = 1.0,
    topk: int | None = None,
    vocab_size: int | None = None,
) -> DistillLoss:
    """L = CE(student, y) + lam · KL(p_teacher ‖ p_student) on the supervised tokens.

    Raw (B, T, V) logits of both models and (B, T) labels with -100 on prompt/padding: the
    causal shift is done here. ``vocab_size`` truncates both logits to their first
    ``vocab_size`` columns (the shared tokenizer's vocabulary), for models whose lm_head is
    padded wider; the truncated logits are used for both terms, so the student's CE and KL see
    the same distribution. Without it the two vocabularies must be equal. See :func:`kd_kl`
    for ``temperature`` and ``topk``. The teacher never receives gradients.
    """
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite non-negative number, got {lam}")
    _check_logits_labels(student_logits, labels)
    if teacher_logits.ndim != 3 or teacher_logits.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"teacher logits must be (batch, seq, vocab) with (batch, seq) = "
            f"{tuple(student_logits.shape[:2])}, got {tuple(teacher_logits.shape)}"
        )
    if vocab_size is not None:
        smallest = min(student_logits.shape[-1], teacher_logits.shape[-1])
        if not 1 <= vocab_size <= smallest:
            raise ValueError(f"vocab_size must be in [1, {smallest}] (the narrower logits), got {vocab_size}")
        student_logits = student_logits[..., :vocab_size]
        teacher_logits = teacher_logits[..., :vocab_size]
    elif student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student vocabulary ({student_logits.shape[-1]}) differs from the teacher's "
            f"({teacher_logits.shape[-1]}); pass vocab_size (the shared tokenizer's size) to truncate both"
        )

    student_shifted, labels_shifted = shift_for_causal_lm(student_logits, labels)
    teacher_shifted = teacher_logits[:, :-1, :]
    mask = supervised_mask(labels_shifted)
    if vocab_size is not None and bool((labels_shifted[mask] >= vocab_size).any()):
        raise ValueError(f"a supervised label is >= vocab_size ({vocab_size}): it would be truncated away")
    ce = _ce_rows(student_shifted, labels_shifted, mask)
    kd = kd_kl(student_shifted, teacher_shifted, mask, temperature=temperature, topk=topk)
    return DistillLoss(total=ce + lam * kd, ce=ce, kd=kd)
