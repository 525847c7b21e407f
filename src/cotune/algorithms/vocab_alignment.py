"""Distillation between two models of different tokenizers: positions aligned by their spans, the
teacher's top-k distribution carried into the student's vocabulary (pure: token byte strings and
tensors in, no tokenizer objects; `models/vocab_map.py` builds the inputs from tokenizers).

What crosses. Both models read the same text, each tokenised by its own tokenizer. Each token is
known by its bytes (its tokenizer's space / byte markers undone, `models/vocab_map.token_pieces`), so
a token sequence has byte spans: token i covers [start_i, end_i) of the text's bytes. Spans come from
the tokens' own bytes rather than a fast tokenizer's offset mapping: training rows are token ids (built
through chat templates and the prompt / answer split), not one text, and byte-level tokenizers' offset
mappings trim each word's leading space (`trim_offsets`) and give both halves of a split character the
same span. `align_spans` takes any increasing spans, an offset mapping's included.

Position alignment (`align_spans`). A *common boundary* is a byte offset where a token of each side
ends (and no token of either side straddles it). The text between two consecutive common boundaries
is one *group*: one token on each side is an exact match (the two spans agree); several on either
side are the covering spans merged into one group, as span-level alignment methods do. A span that
agrees on one side only is never paired on its own. Tokens past the end of the shorter text (the two
texts differ, or one was truncated) are in no group.

Which predictions are paired (`pair_positions`). A causal LM's logits before token i predict token i
from the text before start_i. In every group the first token of each side starts at the same offset,
so both models predict it from the same text: the student's prediction of its group-first token is
distilled from the teacher's prediction of its group-first token. The other tokens of a merged group
(the student's inner pieces) take no KD term: the teacher never predicted from that context.

Carrying a distribution (`carry_topk`). The teacher's top-k probabilities (softmax of its top-k
logits / T, renormalised over the k as the same-tokenizer top-k path does) move to the student's ids
through the vocabulary map (exact byte-string matches, -1: no match); two teacher tokens that map to
one student id add up. The matched mass is the *carried share* c of the position, the rest (1 - c)
its *unmatched share*; the carried distribution sums to c (mass conservation).

The fallback for the unmatched mass, ONE rule: drop it and renormalise over the carried mass (the
KL target is q / c), the rule the same-tokenizer top-k path already applies to the teacher's tail
beyond k. The map is exact matching only, FuseLLM's "EM" token alignment (Wan et al., ICLR 2024)
without its minimum-edit-distance fallback. A position with c = 0 carries nothing and takes no KD term
(it is counted, see `Coverage`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Carried",
    "Coverage",
    "Group",
    "Pairs",
    "align_spans",
    "carried_coverage",
    "carried_kl",
    "carry_topk",
    "clipped",
    "common_prefix",
    "pair_positions",
    "spans_of",
    "supervised_tokens",
]

Span = tuple[int, int]


@dataclass(frozen=True)
class Group:
    """Tokens [a_start, a_stop) of side a and [b_start, b_stop) of side b cover the same bytes."""

    a_start: int
    a_stop: int
    b_start: int
    b_stop: int

    @property
    def exact(self) -> bool:
        """One token on each side: the two spans agree."""
        return self.a_stop - self.a_start == 1 and self.b_stop - self.b_start == 1


def spans_of(pieces: Sequence[bytes]) -> list[Span]:
    """The byte spans of tokens laid end to end (a token's bytes: `models/vocab_map.token_pieces`)."""
    spans, at = [], 0
    for p in pieces:
        spans.append((at, at + len(p)))
        at += len(p)
    return spans


def align_spans(a: Sequence[Span], b: Sequence[Span]) -> list[Group]:
    """The groups of two tokenizations of one text (spans in increasing order, see the module's rule):
    a group closes where a token of each side ends at the same offset and the next token of each side
    starts at or after it; tokens left when either side runs out are in no group."""
    groups: list[Group] = []
    i = j = 0
    gi = gj = 0
    while i < len(a) and j < len(b):
        end_a, end_b = a[i][1], b[j][1]
        if end_a == end_b:
            next_a = a[i + 1][0] if i + 1 < len(a) else end_a
            next_b = b[j + 1][0] if j + 1 < len(b) else end_b
            if next_a >= end_a and next_b >= end_b:
                groups.append(Group(gi, i + 1, gj, j + 1))
                i, j = i + 1, j + 1
                gi, gj = i, j
                continue
            # a side whose next token starts before this end straddles it: that side moves on, the group too
            i, j = (i + 1 if next_a < end_a else i), (j + 1 if next_b < end_b else j)
        elif end_a < end_b:
            i += 1
        else:
            j += 1
    return groups


def common_prefix(a: bytes, b: bytes) -> int:
    """Length of the longest common prefix of two byte strings."""
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def clipped(spans: Sequence[Span], limit: int) -> list[Span]:
    """The spans that end at or before `limit` (the part of the text both sides share)."""
    return [s for s in spans if s[1] <= limit]


@dataclass
class Coverage:
    """What an alignment covered, summed over positions (student side): `positions` supervised tokens
    of the student, `exact` of them in a one-to-one group, `merged` first tokens of a merged group (also
    paired), `unaligned` in no group (texts differ); `carried` and `unmatched` sum each paired
    position's carried / unmatched share of the teacher's top-k mass, `empty` the paired positions with
    nothing carried (no KD term)."""

    positions: int = 0
    exact: int = 0
    merged: int = 0
    unaligned: int = 0
    paired: int = 0
    carried: float = 0.0
    unmatched: float = 0.0
    empty: int = 0

    def add(self, other: Coverage) -> None:
        for name in ("positions", "exact", "merged", "unaligned", "paired", "carried", "unmatched", "empty"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def exact_share(self) -> float:
        """Share of the student's supervised positions whose span agrees with one teacher token."""
        return self.exact / self.positions if self.positions else 0.0

    @property
    def carried_share(self) -> float:
        """Mean share of the teacher's top-k probability mass carried into the student's vocabulary."""
        return self.carried / self.paired if self.paired else 0.0

    @property
    def unmatched_share(self) -> float:
        """Mean share of the teacher's top-k mass on tokens the student's vocabulary lacks (dropped)."""
        return self.unmatched / self.paired if self.paired else 0.0


@dataclass(frozen=True)
class Pairs:
    """Paired predictions in (already shifted) logits coordinates: the student's (row, position) and the
    teacher's, one pair per group; with the coverage of the positions (its mass fields still 0)."""

    rows: Tensor
    student: Tensor
    teacher: Tensor
    coverage: Coverage


def supervised_tokens(labels: Tensor, ignore: int) -> list[tuple[list[int], list[int]]]:
    """Per row of shifted (B, T) labels: the supervised positions and their token ids."""
    out = []
    for row in labels.tolist():
        where = [t for t, v in enumerate(row) if v != ignore]
        out.append((where, [row[t] for t in where]))
    return out


def pair_positions(
    student_labels: Tensor,
    teacher_labels: Tensor,
    student_pieces: Sequence[bytes],
    teacher_pieces: Sequence[bytes],
    ignore: int = -100,
) -> Pairs:
    """The paired predictions of one batch (see the module's rule): per row, the supervised tokens of
    the student's and the teacher's shifted labels (the same examples, each tokenised by its model),
    as byte spans, aligned on their common bytes; each group pairs its first tokens' positions."""
    if student_labels.shape[0] != teacher_labels.shape[0]:
        raise ValueError(
            f"the student's and the teacher's batches differ in rows: {student_labels.shape[0]} and "
            f"{teacher_labels.shape[0]}"
        )
    rows: list[int] = []
    s_at: list[int] = []
    t_at: list[int] = []
    cov = Coverage()
    s_rows = supervised_tokens(student_labels, ignore)
    t_rows = supervised_tokens(teacher_labels, ignore)
    for r, ((s_pos, s_ids), (t_pos, t_ids)) in enumerate(zip(s_rows, t_rows, strict=True)):
        s_bytes = [student_pieces[i] for i in s_ids]
        t_bytes = [teacher_pieces[i] for i in t_ids]
        shared = common_prefix(b"".join(s_bytes), b"".join(t_bytes))
        groups = align_spans(clipped(spans_of(s_bytes), shared), clipped(spans_of(t_bytes), shared))
        cov.positions += len(s_pos)
        grouped = sum(g.a_stop - g.a_start for g in groups)
        cov.unaligned += len(s_pos) - grouped
        for g in groups:
            if g.exact:
                cov.exact += 1
            else:
                cov.merged += 1
            rows.append(r)
            s_at.append(s_pos[g.a_start])
            t_at.append(t_pos[g.b_start])
    cov.paired = len(rows)
    at_rows, at_s, at_t = (
        torch.tensor(x, dtype=torch.long, device=student_labels.device) for x in (rows, s_at, t_at)
    )
    return Pairs(at_rows, at_s, at_t, cov)


@dataclass(frozen=True)
class Carried:
    """A teacher's top-k distribution in the student's vocabulary, (N, k) each: student ids (0 where a
    slot is empty) and their probabilities (0 where empty); `share` (N,) the carried mass per row, which
    is the sum of `probs` over the row (mass conservation)."""

    ids: Tensor
    probs: Tensor
    share: Tensor


def carry_topk(values: Tensor, indices: Tensor, vocab_map: Tensor, temperature: float = 1.0) -> Carried:
    """Carry (N, k) teacher top-k logits at vocabulary `indices` into the student's vocabulary through
    `vocab_map` (teacher id -> student id, -1: no match): probabilities softmax(values / T) over the k;
    matched mass moves to the student id (ids that repeat are summed), unmatched mass is left out."""
    if values.shape != indices.shape or values.ndim != 2:
        raise ValueError(
            f"values and indices must both be (N, k), got {tuple(values.shape)}, {tuple(indices.shape)}"
        )
    probs = F.softmax(values.detach().float() / temperature, dim=-1)
    mapped = vocab_map.to(indices.device)[indices]
    matched = mapped >= 0
    probs = torch.where(matched, probs, 0.0)
    share = probs.sum(-1)
    # one slot per distinct student id of a row: sort the ids, start a run at each new one, sum each run
    order = mapped.argsort(dim=-1)
    ids_sorted = mapped.gather(-1, order)
    probs_sorted = probs.gather(-1, order)
    new_run = torch.ones_like(ids_sorted, dtype=torch.bool)
    new_run[:, 1:] = ids_sorted[:, 1:] != ids_sorted[:, :-1]
    run = new_run.long().cumsum(-1) - 1
    merged = torch.zeros_like(probs_sorted).scatter_add_(-1, run, probs_sorted)
    ids = torch.zeros_like(ids_sorted).scatter_(-1, run, ids_sorted.clamp(min=0))
    return Carried(ids, merged, share)


def carried_kl(student_rows: Tensor, carried: Carried, temperature: float = 1.0) -> Tensor:
    """KL(q / c ‖ p_student) per row, averaged over the rows with carried mass c > 0, times T² (the
    stated fallback: the unmatched mass dropped, the carried renormalised). The student's (N, V) logits
    at the paired positions go through a full-vocabulary log_softmax / T in float32, gathered at the
    carried ids. No row with mass: 0, still connected to the student's graph."""
    keep = carried.share > 0
    if not bool(keep.any()):
        return student_rows.float().sum() * 0.0
    log_p_student = F.log_softmax(student_rows[keep].float() / temperature, dim=-1)
    log_p_student = log_p_student.gather(-1, carried.ids[keep])
    q = carried.probs[keep] / carried.share[keep, None]
    terms = torch.where(q > 0, q * (q.clamp(min=1e-30).log() - log_p_student), 0.0)
    loss = terms.sum(-1).mean()
    return loss * (temperature**2) if temperature != 1.0 else loss


def carried_coverage(pairs: Pairs, carried: Carried) -> Coverage:
    """The pairs' coverage with the carried and unmatched mass of their teacher positions."""
    cov = Coverage()
    cov.add(pairs.coverage)
    cov.carried = float(carried.share.sum())
    cov.unmatched = float((1.0 - carried.share).sum())
    cov.empty = int((carried.share <= 0).sum())
    return cov
