"""Membership inference: how well an attacker tells a client's training examples (members) from its
held-out ones (non-members) by the released model's losses on them. Pure functions on loss tensors.

Two attacks, each a score per example (higher: "more likely a member"):

* **loss threshold** (Yeom et al. 2018): score = -loss under the target model (the client's adapter).
  Examples a model was trained on tend to have lower loss.
* **reference-calibrated** (Carlini et al. 2022, "Membership inference attacks from first principles",
  offline variant; Watson et al. 2022, "On the importance of difficulty calibration in membership
  inference attacks"): score = reference loss - target loss, the reference being the same frozen base
  model *without* the client's adapter (the zero-shot model, which never saw any client's data). It
  removes how hard an example is in itself (a short common text has low loss under any model), so
  what is left is what the adapter learnt about that very example: a stronger attack at low FPR.

Each is scored as ROC AUC (0.5: no better than a coin; 1: every member above every non-member) and as
the TPR at 1% FPR (the fraction of members caught while wrongly flagging at most 1% of non-members:
what a confident attacker gets, the figure Carlini et al. argue for).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from cotune.evaluation.lm import IGNORE_INDEX

LOW_FPR = 0.01  # the false-positive rate the TPR is read at


def roc_auc(members: torch.Tensor, nonmembers: torch.Tensor) -> float:
    """ROC AUC of scores where higher means member: P(member score > non-member score) + P(tie) / 2,
    the Mann-Whitney U statistic over n_m * n_n, computed from ranks (ties get their average rank)."""
    m, n = check_scores(members, nonmembers)
    scores = torch.cat([m, n])
    order = torch.argsort(scores, stable=True)
    ordered = scores[order]
    ranks = torch.empty_like(scores)
    start = 0
    while start < len(ordered):  # average 1-based ranks over each run of equal scores
        end = start + 1
        while end < len(ordered) and ordered[end] == ordered[start]:
            end += 1
        ranks[order[start:end]] = (start + 1 + end) / 2
        start = end
    u = float(ranks[: len(m)].sum()) - len(m) * (len(m) + 1) / 2
    return u / (len(m) * len(n))


def tpr_at_fpr(members: torch.Tensor, nonmembers: torch.Tensor, fpr: float = LOW_FPR) -> float:
    """The largest TPR over thresholds t whose FPR is at most `fpr`, a member flagged when its score is
    >= t: the ROC curve's step function read without interpolation (conservative: never a TPR the
    attacker cannot reach). With fewer than 1 / fpr non-members that means FPR 0: only members scored
    above every non-member count."""
    m, n = check_scores(members, nonmembers)
    allowed = int(fpr * len(n) + 1e-9)  # non-members that may be flagged
    above = torch.sort(n, descending=True).values
    if allowed >= len(n):
        return 1.0
    bar = above[allowed]  # flag strictly above the (allowed+1)-th highest non-member score
    return float((m > bar).float().mean())


def check_scores(members: torch.Tensor, nonmembers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both score sets as float64 vectors, refused when one is empty or not finite (no AUC exists)."""
    m, n = members.double().flatten(), nonmembers.double().flatten()
    if len(m) == 0 or len(n) == 0:
        raise ValueError("membership inference needs at least one member and one non-member example")
    if not (torch.isfinite(m).all() and torch.isfinite(n).all()):
        raise ValueError("membership scores must be finite (leave out examples without a scored token)")
    return m, n


def evidence_losses(values: torch.Tensor, indices: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's mean loss of its true next tokens as read off an uploaded top-k release alone (the
    attack on prediction trust's evidence): values and indices (B, T, k), targets (B, T), IGNORE_INDEX
    where a position has none. The loss of a position is -log softmax over its k values at the target's,
    the smallest of them standing in for a target not among the k (the most the release says of it); a
    row with no scored position gets NaN, for the caller to leave out."""
    logp = torch.log_softmax(values.double(), dim=-1)
    hit = indices == targets.unsqueeze(-1)
    at_target = torch.where(hit.any(-1), (logp * hit).sum(-1), logp.min(-1).values)
    scored = targets != IGNORE_INDEX
    count = scored.sum(1)
    total = (-at_target * scored).sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), math.nan)


def evidence_ranks(values: torch.Tensor, indices: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's mean reciprocal rank of its true next tokens among an uploaded release's k values (0
    where a target is not among them; rank 1 + the values strictly above it), shapes as
    `evidence_losses`: a score that neither a shift nor a rescaling of a position's values changes, so
    clipping alone does not blunt it (higher: member); NaN for a row with no scored position."""
    hit = indices == targets.unsqueeze(-1)  # (B, T, k)
    above = (values.unsqueeze(-2) > values.unsqueeze(-1)).sum(-1)  # per value: how many are larger
    reciprocal = (hit / (above + 1).double()).sum(-1)
    scored = targets != IGNORE_INDEX
    count = scored.sum(1)
    return torch.where(count > 0, (reciprocal * scored).sum(1) / count.clamp_min(1), math.nan)


@dataclass(frozen=True)
class AttackResult:
    """One attack's figures on one client."""

    auc: float
    tpr_at_1pct_fpr: float

    @classmethod
    def of(cls, members: torch.Tensor, nonmembers: torch.Tensor) -> AttackResult:
        return cls(roc_auc(members, nonmembers), tpr_at_fpr(members, nonmembers, LOW_FPR))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Losses:
    """Per-example losses of the same examples under the target model and the reference model."""

    target: torch.Tensor
    reference: torch.Tensor

    def scored(self) -> Losses:
        """Only the examples both models scored (a NaN loss: no scored token)."""
        keep = torch.isfinite(self.target) & torch.isfinite(self.reference)
        return Losses(self.target[keep], self.reference[keep])


def loss_scores(losses: Losses) -> torch.Tensor:
    """The loss-threshold attack's scores: -target loss."""
    return -losses.target.double()


def calibrated_scores(losses: Losses) -> torch.Tensor:
    """The reference-calibrated attack's scores: reference loss - target loss."""
    return losses.reference.double() - losses.target.double()


@dataclass(frozen=True)
class MembershipAudit:
    """Both attacks on one client: members are its training examples, non-members its held-out ones."""

    members: int
    nonmembers: int
    loss: AttackResult
    calibrated: AttackResult

    @classmethod
    def of(cls, members: Losses, nonmembers: Losses) -> MembershipAudit:
        m, n = members.scored(), nonmembers.scored()
        return cls(
            len(m.target),
            len(n.target),
            AttackResult.of(loss_scores(m), loss_scores(n)),
            AttackResult.of(calibrated_scores(m), calibrated_scores(n)),
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "members": self.members,
            "nonmembers": self.nonmembers,
            "loss": self.loss.as_dict(),
            "calibrated": self.calibrated.as_dict(),
        }
