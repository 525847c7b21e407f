"""Distillation across tokenizers: hand-made tokenizations aligned by their byte spans, the vocabulary map
by exact bytes after each tokenizer's markers, the teacher's top-k carried into the student's vocabulary
(mass conservation, identity with one tokenizer), and a loss that pairs only aligned positions."""

from __future__ import annotations

import time

import pytest
import torch

from cotune.algorithms.distillation import kd_kl_from_topk
from cotune.algorithms.vocab_alignment import (
    Group,
    align_spans,
    carried_coverage,
    carried_kl,
    carry_topk,
    pair_positions,
    spans_of,
)
from cotune.models.tiny import byte_tokenizer, merged_tokenizer
from cotune.models.vocab_map import EOS_PIECE, build_bridge, one_way, piece_of, token_pieces

BYTE_LEVEL = {"byte_level"}
SENTENCEPIECE = {"metaspace", "byte_fallback"}


def groups_of(a: list[bytes], b: list[bytes]) -> list[tuple[int, int, int, int]]:
    return [(g.a_start, g.a_stop, g.b_start, g.b_stop) for g in align_spans(spans_of(a), spans_of(b))]


# ---- token bytes: each tokenizer's markers undone ---------------------------------------------------------
def test_whitespace_markers_byte_level_and_sentencepiece() -> None:
    assert piece_of("Ġthe", BYTE_LEVEL) == b" the"
    assert piece_of("Ċ", BYTE_LEVEL) == b"\n"
    assert piece_of("ĠĠ", BYTE_LEVEL) == b"  "
    assert piece_of("\u2581the", SENTENCEPIECE) == b" the"
    assert piece_of("the", SENTENCEPIECE) == b"the"


def test_byte_fallback_tokens_are_their_byte() -> None:
    assert piece_of("<0x0A>", SENTENCEPIECE) == b"\n"
    assert piece_of("<0xC3>", SENTENCEPIECE) == b"\xc3"
    assert piece_of("<0x0A>", BYTE_LEVEL) == b"<0x0A>"  # a byte-level tokenizer has no such tokens


def test_unicode_pieces() -> None:
    assert piece_of("Ã©", BYTE_LEVEL) == "é".encode()  # one byte-level token of two bytes
    assert piece_of("Ã", BYTE_LEVEL) == b"\xc3"  # half a character
    assert piece_of("\u2581café", SENTENCEPIECE) == " café".encode()


def test_map_across_conventions_matches_same_bytes() -> None:
    """A byte-level vocabulary and a SentencePiece one meet on bytes; a duplicate goes to the lowest id."""
    byte_level = [piece_of(t, BYTE_LEVEL) for t in ["Ġthe", "Ċ", "Ã©", "ĠHiro", "x"]]
    sp = [piece_of(t, SENTENCEPIECE) for t in ["<0x0A>", "\u2581the", "é", "\u2581Hi", "\n", "<0x78>"]]
    assert one_way(byte_level, sp).tolist() == [1, 0, 2, -1, 5]
    assert one_way(sp, byte_level).tolist() == [1, 0, 2, -1, 1, 4]


# ---- position alignment -----------------------------------------------------------------------------------
def test_identical_tokenizations_align_one_to_one() -> None:
    a = [b" The", b" cat", b" sat", b"."]
    assert groups_of(a, a) == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3), (3, 4, 3, 4)]
    assert all(g.exact for g in align_spans(spans_of(a), spans_of(a)))


def test_split_differently_merges_the_covering_spans() -> None:
    a = [b" Hi", b"ro", b"shima", b" is"]
    b = [b" Hiro", b"shima", b" is"]
    assert groups_of(a, b) == [(0, 2, 0, 1), (2, 3, 1, 2), (3, 4, 2, 3)]
    crossing = [b" H", b"iros", b"hima"]  # no common boundary inside the word: one group
    assert groups_of(crossing, b[:2]) == [(0, 3, 0, 2)]


def test_byte_fallback_and_unicode_split_align() -> None:
    """`é` as one byte-level token against two byte-fallback tokens: one merged group."""
    a = [piece_of(t, BYTE_LEVEL) for t in ["Ġcaf", "Ã©", "Ċ"]]
    b = [piece_of(t, SENTENCEPIECE) for t in ["\u2581caf", "<0xC3>", "<0xA9>", "<0x0A>"]]
    assert groups_of(a, b) == [(0, 1, 0, 1), (1, 2, 1, 3), (2, 3, 3, 4)]


def test_straddled_offsets_do_not_close_a_group() -> None:
    """Spans that overlap (e.g. an offset mapping that gives both halves of a character its span) close a
    group only where the next token on each side starts at or after the common end."""
    a = [(0, 2), (0, 2), (2, 4)]
    b = [(0, 2), (2, 4)]
    assert align_spans(a, b) == [Group(0, 2, 0, 1), Group(2, 3, 1, 2)]


def test_texts_that_differ_align_only_their_common_prefix() -> None:
    s = torch.tensor([[5, 0, 1, 2]])  # shifted labels: position 0 unsupervised
    t = torch.tensor([[0, 1, 3]])
    s_pieces = [b" a", b" b", b" c", b"", b"", b"?"]
    t_pieces = [b" a", b" b", b"", b" d"]
    s[0, 0] = -100
    pairs = pair_positions(s, t, s_pieces, t_pieces)
    assert pairs.student.tolist() == [1, 2] and pairs.teacher.tolist() == [0, 1]
    assert pairs.coverage.positions == 3 and pairs.coverage.unaligned == 1 and pairs.coverage.exact == 2


# ---- carrying a distribution ------------------------------------------------------------------------------
def test_mass_conservation_and_duplicates_summed() -> None:
    torch.manual_seed(0)
    values = torch.randn(6, 5)
    indices = torch.tensor([[0, 1, 2, 3, 4]] * 6)
    vocab_map_ = torch.tensor([7, -1, 7, 2, -1])  # teacher 0 and 2 -> student 7; 1 and 4 unmatched
    carried = carry_topk(values, indices, vocab_map_, temperature=2.0)
    p = torch.softmax(values / 2.0, dim=-1)
    expected_share = p[:, [0, 2, 3]].sum(-1)
    assert torch.allclose(carried.probs.sum(-1), carried.share)
    assert torch.allclose(carried.share, expected_share)
    at7 = (carried.probs * (carried.ids == 7)).sum(-1)
    assert torch.allclose(at7, p[:, 0] + p[:, 2])
    assert int(((carried.ids == 7) & (carried.probs > 0)).sum(-1).max()) == 1  # one slot per student id


def test_identity_when_the_tokenizers_are_the_same(tmp_path) -> None:
    """One tokenizer on both sides: the map is the identity, every position pairs with itself, and the
    carried KL is the same-tokenizer top-k KL."""
    tok = merged_tokenizer()
    bridge = build_bridge(tok, tok, cache_dir=tmp_path)
    assert bridge.slm_to_llm.tolist() == list(range(len(tok)))
    labels = torch.tensor([[-100, -100, 40, 41, 288], [-100, 50, 51, 52, 288]])
    pairs = pair_positions(labels, labels, bridge.slm_pieces, bridge.llm_pieces)
    mask = labels != -100
    assert pairs.rows.tolist() == mask.nonzero()[:, 0].tolist()
    assert pairs.student.tolist() == pairs.teacher.tolist() == mask.nonzero()[:, 1].tolist()
    torch.manual_seed(1)
    student = torch.randn(2, 5, len(tok))
    values, indices = torch.randn(2, 5, len(tok)).topk(8, dim=-1)
    carried = carry_topk(values[mask], indices[mask], bridge.llm_to_slm, temperature=1.5)
    kl = carried_kl(student[mask], carried, temperature=1.5)
    same = kd_kl_from_topk(student, values, indices, mask, temperature=1.5)
    assert torch.allclose(kl, same, atol=1e-5)
    cov = carried_coverage(pairs, carried)
    assert cov.exact_share == 1.0 and cov.carried_share == pytest.approx(1.0) and cov.unmatched_share < 1e-6


def test_loss_pairs_only_aligned_positions() -> None:
    """The student predicts exactly what the teacher predicts at every aligned position, and something
    else at the inner pieces of a merged group: the carried KL is ~0 only when each group's first
    predictions are paired. Pairing the supervised positions in order (as one tokenizer would) is far off."""
    s_pieces = [b" Hi", b"ro", b"shima", b" is", b" big", b"?", b"!", b" Hiro"]
    t_pieces = [b" big", b" Hiro", b"shima", b" is", b"x"]
    s_labels = torch.tensor([[-100, 0, 1, 2, 3, 4]])  # " Hi" "ro" "shima" " is" " big" at 1..5
    t_labels = torch.tensor([[-100, -100, -100, 1, 2, 3, 0]])  # " Hiro" "shima" " is" " big" at 3..6
    to_student = one_way(t_pieces, s_pieces)
    pairs = pair_positions(s_labels, t_labels, s_pieces, t_pieces)
    sharp = 30.0
    teacher = torch.full((1, 7, len(t_pieces)), -sharp)
    for t in range(7):  # the teacher is sure of its own next token
        if t_labels[0, t] >= 0:
            teacher[0, t, t_labels[0, t]] = sharp
    student = torch.full((1, 6, len(s_pieces)), -sharp)
    student[0, :, 5] = sharp  # "?" wherever nothing is said
    for s, t in [(1, 3), (3, 4), (4, 5), (5, 6)]:  # the group-first predictions: the teacher's tokens
        student[0, s, 5] = -sharp
        student[0, s, int(to_student[int(t_labels[0, t])])] = sharp
    values, indices = teacher.topk(3, dim=-1)

    def loss(rows: torch.Tensor, s_at: torch.Tensor, t_at: torch.Tensor) -> float:
        carried = carry_topk(values[rows, t_at], indices[rows, t_at], torch.from_numpy(to_student))
        return float(carried_kl(student[rows, s_at], carried))

    assert loss(pairs.rows, pairs.student, pairs.teacher) < 1e-3
    assert pairs.student.tolist() == [1, 3, 4, 5] and pairs.teacher.tolist() == [3, 4, 5, 6]
    in_order = torch.tensor([1, 2, 3, 4]), torch.tensor([3, 4, 5, 6])
    assert loss(torch.zeros(4, dtype=torch.long), *in_order) > 10.0
    assert pairs.coverage.exact == 3 and pairs.coverage.merged == 1 and pairs.coverage.positions == 5


# ---- the vocabulary map of real (tiny) tokenizers, cached -------------------------------------------------
def test_tiny_tokenizers_map_and_cache(tmp_path) -> None:
    a, b = byte_tokenizer(), merged_tokenizer()
    first = build_bridge(a, b, cache_dir=tmp_path)
    assert not first.vocab.cached
    again = build_bridge(a, b, cache_dir=tmp_path)
    assert again.vocab.cached and again.vocab.digest == first.vocab.digest
    assert (again.slm_to_llm == first.slm_to_llm).all()
    pieces_a, pieces_b = token_pieces(a), token_pieces(b)
    assert pieces_a[a.eos_token_id] == pieces_b[b.eos_token_id] == EOS_PIECE
    assert int(first.slm_to_llm[a.eos_token_id]) == b.eos_token_id  # EOS by role, at another id
    assert (first.slm_to_llm >= 0).all()  # every byte is a token of both
    merged = b.convert_tokens_to_ids("Ġthe")
    assert int(first.llm_to_slm[merged]) == -1  # " the" is one token only in b
    other = build_bridge(b, a, cache_dir=tmp_path)
    assert other.vocab.digest != first.vocab.digest  # the direction is part of the key


def test_map_of_a_large_vocabulary_is_quick() -> None:
    """Dict lookups, not pairwise comparisons: 150k x 50k builds in well under a second here."""
    big = [f"tok{i}".encode() for i in range(150_000)]
    small = [f"tok{i * 3}".encode() for i in range(50_000)]
    t0 = time.perf_counter()
    m = one_way(small, big)
    assert time.perf_counter() - t0 < 5.0
    assert m[:3].tolist() == [0, 3, 6]
