"""Server-side mutual knowledge distillation between the LLM and the SLM (FedCoLLM step 4).

On each public batch: the SLM learns from CE + lambda*KL(p_LLM || p_SLM) with the LLM as a
detached teacher, then the LLM learns from CE + lambda*KL(p_SLM || p_LLM) with the (just
updated) SLM as a detached teacher. Teacher logits exist for one micro-batch at a time and,
with `topk`, only the teacher's k largest logits per position are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
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
from cotune.config.schema import DistillConfig
from cotune.training.loop import optimizer_step


@dataclass
class TeacherSignal:
    """What the student sees of the teacher: full logits, or (values, indices) of its top-k."""

    logits: torch.Tensor | None = None
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    choices: torch.Tensor | None = None  # (B, C): logits at the answer position, at the choices' first tokens

    @property
    def empty(self) -> bool:
        """No teacher at all (the fedavg_ft control): the student's step is cross-entropy alone."""
        return all(t is None for t in (self.logits, self.values, self.indices, self.choices))

    @property
    def nbytes(self) -> int:
        held = [t for t in (self.logits, self.values, self.indices, self.choices) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)


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


def kd_term(
    logits: torch.Tensor, teacher: TeacherSignal, batch: Mapping[str, torch.Tensor], cfg: DistillConfig
) -> torch.Tensor:
    """KL(teacher || student) on the student's `logits`: over the choices, the full vocabulary or the
    teacher's top-k, whichever signal the teacher sent."""
    shifted, labels = shift_for_causal_lm(logits, batch["labels"])
    mask = supervised_mask(labels)
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
