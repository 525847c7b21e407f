"""Server-side mutual knowledge distillation between the LLM and the SLM (FedCoLLM step 4).

On each public batch: the SLM learns from CE + lambda*KL(p_LLM || p_SLM) with the LLM as a
detached teacher, then the LLM learns from CE + lambda*KL(p_SLM || p_LLM) with the (just
updated) SLM as a detached teacher. Teacher logits exist for one micro-batch at a time and,
with `topk`, only the teacher's k largest logits per position are kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cotune.algorithms.distillation import (
    answer_positions,
    choice_logits,
    kd_kl,
    kd_kl_choices,
    kd_kl_from_topk,
    shift_for_causal_lm,
    supervised_mask,
    task_ce,
    teacher_topk,
)
from cotune.algorithms.vocab_alignment import (
    Carried,
    Coverage,
    carried_coverage,
    carried_kl,
    carry_topk,
    pair_positions,
)
from cotune.config.schema import DistillConfig
from cotune.training.loop import optimizer_step


@dataclass
class TeacherSignal:
    """What the student sees of the teacher: full logits, or (values, indices) of its top-k."""

    logits: torch.Tensor | None = None
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    choices: torch.Tensor | None = None  # (B, C): logits at the answer position, at the choices' first tokens
    # a teacher of another tokenizer: its top-k carried into the student's vocabulary at the paired
    # positions, and those positions in the student's shifted logits (rows, positions)
    carried: Carried | None = None
    at: tuple[torch.Tensor, torch.Tensor] | None = None

    def held(self) -> list[torch.Tensor]:
        carried = [] if self.carried is None else [self.carried.ids, self.carried.probs]
        return [t for t in (self.logits, self.values, self.indices, self.choices) if t is not None] + carried

    @property
    def empty(self) -> bool:
        """No teacher at all (the fedavg_ft control): the student's step is cross-entropy alone."""
        return not self.held()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.held())


@torch.no_grad()
def teacher_signal(
    teacher: nn.Module,
    batch: Mapping[str, torch.Tensor],
    vocab_size: int,
    topk: int | None,
    target: str = "vocab",
) -> TeacherSignal:
    """The teacher's signal on `batch`: over the vocabulary (full logits or their top-k) at every answer
    token, or (target 'choices') its logits at the answer's first position, at the choices' first tokens."""
    teacher.eval()
    logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1, :vocab_size]
    if target == "choices":
        if "choices" not in batch:
            raise ValueError(
                "distill.kd_target 'choices' needs the public set's choices (a multiple-choice task)"
            )
        positions = answer_positions(batch["labels"][:, 1:])
        return TeacherSignal(choices=choice_logits(logits, positions, batch["choices"]))
    if topk is None:
        return TeacherSignal(logits=logits)
    values, indices = teacher_topk(logits, topk)
    return TeacherSignal(values=values, indices=indices)


@torch.no_grad()
def crossed_signal(
    teacher: nn.Module,
    teacher_batch: Mapping[str, torch.Tensor],
    student_batch: Mapping[str, torch.Tensor],
    pieces: tuple[Sequence[bytes], Sequence[bytes]],
    to_student: torch.Tensor,
    teacher_vocab: int,
    topk: int | None,
    temperature: float,
) -> tuple[TeacherSignal, Coverage]:
    """A teacher of another tokenizer (`algorithms/vocab_alignment`): both models' batches hold the same
    examples, each encoded by its tokenizer; the predictions are paired by their text (`pair_positions`,
    `pieces` = (student's, teacher's) bytes by id) and the teacher's top-k (all of its vocabulary without
    `topk`) at each paired position carried into the student's vocabulary through `to_student`."""
    teacher.eval()
    ids, mask = teacher_batch["input_ids"], teacher_batch["attention_mask"]
    logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1, :teacher_vocab]
    pairs = pair_positions(student_batch["labels"][:, 1:], teacher_batch["labels"][:, 1:], *pieces)
    at_teacher = logits[pairs.rows.to(logits.device), pairs.teacher.to(logits.device)]
    values, indices = teacher_topk(at_teacher, topk or teacher_vocab)
    carried = carry_topk(values, indices, to_student, temperature)
    device = student_batch["labels"].device
    at = (pairs.rows.to(device), pairs.student.to(device))
    return TeacherSignal(carried=carried, at=at), carried_coverage(pairs, carried)


def kd_term(
    logits: torch.Tensor, teacher: TeacherSignal, batch: Mapping[str, torch.Tensor], cfg: DistillConfig
) -> torch.Tensor:
    """KL(teacher || student) on the student's `logits`: over the choices, the full vocabulary or the
    teacher's top-k, whichever signal the teacher sent."""
    shifted, labels = shift_for_causal_lm(logits, batch["labels"])
    mask = supervised_mask(labels)
    if teacher.carried is not None:
        assert teacher.at is not None
        return carried_kl(shifted[teacher.at], teacher.carried, temperature=cfg.temperature)
    if teacher.choices is not None:
        student_choices = choice_logits(shifted, answer_positions(labels), batch["choices"])
        return kd_kl_choices(student_choices, teacher.choices, temperature=cfg.temperature)
    if teacher.logits is not None:
        return kd_kl(shifted, teacher.logits, mask, temperature=cfg.temperature)
    assert teacher.values is not None and teacher.indices is not None  # a top-k signal
    return kd_kl_from_topk(shifted, teacher.values, teacher.indices, mask, temperature=cfg.temperature)


def student_step(
    student: nn.Module,
    teacher: TeacherSignal,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: DistillConfig,
    vocab_size: int,
    max_grad_norm: float | None,
) -> tuple[float, float]:
    """One optimizer step of CE + lambda*KL(teacher || student); returns (ce, kd).

    A teacher signal that holds nothing (`TeacherSignal()`: no teacher, the fedavg_ft control) makes it
    the cross-entropy step alone (lambda = 0, kd reported as 0): the control runs this same step, so its
    server steps differ from FedCoLLM's SLM side only by the KL term."""
    student.train()
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[..., :vocab_size]
    ce = task_ce(logits, batch["labels"])
    kd = None if teacher.empty else kd_term(logits, teacher, batch, cfg)
    (ce if kd is None else ce + cfg.lam * kd).backward()
    optimizer_step(optimizer, scheduler, max_grad_norm)
    return ce.item(), 0.0 if kd is None else kd.item()
