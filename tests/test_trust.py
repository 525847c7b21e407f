"""Trust matrices checked against numbers computed by hand (not by re-running the same formulas)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cotune.algorithms.trust import (
    PredictionDistance,
    identity_trust,
    oracle_trust,
    prediction_scores,
    similarity_scores,
    topk_mask_logits,
    trust_from_scores,
    uniform_trust,
    validation_scores,
    weight_similarity,
)

A = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.layers.0.self_attn.q_proj.lora_B.weight"
A2 = "base_model.model.layers.0.self_attn.v_proj.lora_A.weight"
B2 = "base_model.model.layers.0.self_attn.v_proj.lora_B.weight"


def _softmax_row(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def _assert_rows_sum_to_one(w: torch.Tensor) -> None:
    assert torch.allclose(w.sum(dim=1), torch.ones(w.shape[0]), atol=1e-6)


# ---------------------------------------------------------------- fixed strategies


def test_identity_and_uniform() -> None:
    assert torch.equal(identity_trust(3), torch.eye(3))
    u = uniform_trust(4)
    assert u.dtype == torch.float32 and u.shape == (4, 4)
    assert torch.allclose(u, torch.full((4, 4), 0.25))
    with pytest.raises(ValueError):
        uniform_trust(0)


# ---------------------------------------------------------------- weight similarity


def _two_clients() -> list[dict[str, torch.Tensor]]:
    # peft layout: lora_A (r=2, in=2), lora_B (out=2, r=2); the cosines run over columns.
    c0 = {A: torch.tensor([[1.0, 0.0], [0.0, 1.0]]), B: torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    c1 = {
        # A columns: (2, 0) parallel to (1, 0) -> 1; (1, 0) orthogonal to (0, 1) -> 0
        A: torch.tensor([[2.0, 1.0], [0.0, 0.0]]),
        # B columns: (-1, 0) opposite to (1, 0) -> -1; (0, 3) parallel to (0, 1) -> 1
        B: torch.tensor([[-1.0, 0.0], [0.0, 3.0]]),
    }
    return [c0, c1]


def test_weight_similarity_hand_example() -> None:
    s = weight_similarity(_two_clients())
    assert s.shape == (2, 2) and s.dtype == torch.float32
    # in + r = 4 cosines: (1 + 0 - 1 + 1) / 4
    expected = torch.tensor([[1.0, 0.25], [0.25, 1.0]])
    assert torch.allclose(s, expected, atol=1e-6)


def test_weight_similarity_pools_all_modules_into_one_mean() -> None:
    c0, c1 = _two_clients()
    # Second module: A (r=2, in=1), B (out=3, r=2), identical in both clients -> 1 + 2 cosines of 1.
    a2 = torch.tensor([[1.0], [0.0]])
    b2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    c0 = {**c0, A2: a2, B2: b2}
    c1 = {**c1, A2: a2.clone(), B2: b2.clone()}
    s = weight_similarity([c0, c1])
    # pooled: (1 + 0 - 1 + 1 + 1 + 1 + 1) / 7 = 4/7, not the mean of module means (0.25 + 1) / 2
    assert s[0, 1].item() == pytest.approx(4 / 7, abs=1e-6)
    assert s[1, 0].item() == pytest.approx(4 / 7, abs=1e-6)


def test_weight_similarity_zero_b_gives_zero_not_nan() -> None:
    fresh = {A: torch.tensor([[1.0, 0.0], [0.0, 1.0]]), B: torch.zeros(2, 2)}
    other = {A: torch.tensor([[1.0, 0.0], [0.0, 1.0]]), B: torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    s = weight_similarity([fresh, other])
    assert not torch.isnan(s).any()
    # A columns agree (1, 1), B columns involve a zero vector (0, 0): 2 / 4, including with itself.
    assert torch.allclose(s, torch.tensor([[0.5, 0.5], [0.5, 1.0]]), atol=1e-6)


def test_weight_similarity_matches_torch_cosine_on_random_adapters() -> None:
    g = torch.Generator().manual_seed(0)
    adapters = [
        {A: torch.randn(4, 6, generator=g), B: torch.randn(5, 4, generator=g), "some.bias": torch.randn(5)}
        for _ in range(3)
    ]
    s = weight_similarity(adapters)
    for i in range(3):
        for j in range(3):
            cos = torch.cat(
                [
                    F.cosine_similarity(adapters[i][A], adapters[j][A], dim=0),
                    F.cosine_similarity(adapters[i][B], adapters[j][B], dim=0),
                ]
            )
            assert cos.numel() == 6 + 4  # in + r values
            assert s[i, j].item() == pytest.approx(cos.mean().item(), abs=1e-6)


def test_weight_similarity_rejects_mismatches() -> None:
    c0, c1 = _two_clients()
    with pytest.raises(ValueError, match="lora_B"):
        weight_similarity([c0, {A: c1[A]}])
    with pytest.raises(ValueError, match="shape"):
        weight_similarity([c0, {A: torch.zeros(3, 2), B: c1[B]}])
    with pytest.raises(ValueError, match="LoRA"):
        weight_similarity([{"x": torch.ones(2, 2)}, {"x": torch.ones(2, 2)}])


# ---------------------------------------------------------------- validation performance


def test_validation_scores_softmax_by_hand() -> None:
    p = [[10.0, 12.0, 20.0], [15.0, 11.0, 13.0], [30.0, 30.5, 9.0]]
    scores = validation_scores(torch.tensor(p))
    assert torch.allclose(scores, -torch.tensor(p))
    w = trust_from_scores(scores)
    for i in range(3):
        expected = _softmax_row([-v for v in p[i]])
        assert w[i].tolist() == pytest.approx(expected, abs=1e-6)
    _assert_rows_sum_to_one(w)
    # tau divides: -P / 2
    assert torch.allclose(validation_scores(torch.tensor(p), tau=2.0), -torch.tensor(p) / 2)


def test_similarity_scores_divide_by_tau() -> None:
    s = torch.tensor([[1.0, 0.25], [0.25, 1.0]])
    assert torch.allclose(similarity_scores(s), s)
    assert torch.allclose(similarity_scores(s, tau=0.5), 2 * s)
    with pytest.raises(ValueError, match="square"):
        similarity_scores(torch.ones(2, 3))
    with pytest.raises(ValueError, match="tau"):
        similarity_scores(s, tau=0.0)


# ---------------------------------------------------------------- prediction similarity


def test_topk_mask_logits() -> None:
    x = torch.tensor([[4.0, 3.0, 1.0, 0.0], [-1.0, 2.0, 0.0, 6.0]])
    assert torch.equal(topk_mask_logits(x, 2), torch.tensor([[4.0, 3.0, 0.0, 0.0], [0.0, 2.0, 0.0, 6.0]]))
    assert torch.equal(topk_mask_logits(x, 10), x)
    with pytest.raises(ValueError):
        topk_mask_logits(x, 0)


def _three_client_batch() -> torch.Tensor:
    """(N=3, B=2, T=2, V=4). Sequence 1 is identical across clients, so only sequence 0 differs."""
    seq0 = torch.tensor(
        [
            [[4.0, 3.0, 1.0, 0.0], [0.0, 1.0, 5.0, 2.0]],  # client 0 -> [4,3,0,0], [0,0,5,2]
            [[4.0, 1.0, 3.0, 0.0], [0.0, 1.0, 5.0, 2.0]],  # client 1 -> [4,0,3,0], [0,0,5,2]
            [[-1.0, 2.0, 0.0, 6.0], [3.0, -2.0, 1.0, 0.0]],  # client 2 -> [0,2,0,6], [3,0,1,0]
        ]
    )
    seq1 = torch.tensor([[1.0, 7.0, 2.0, 3.0], [5.0, 0.0, 1.0, 2.0]]).expand(3, 2, 4)
    return torch.stack([seq0, seq1], dim=1)


# d01 = (0+3+3+0) + 0 = 6; d02 = (4+1+0+6) + (3+0+4+2) = 20; d12 = (4+2+3+6) + 9 = 24; / (1 batch × 2 seqs)
HAND_D = [[0.0, 3.0, 10.0], [3.0, 0.0, 12.0], [10.0, 12.0, 0.0]]


def test_prediction_distance_by_hand() -> None:
    pd = PredictionDistance(3, k=2)
    logits = _three_client_batch()
    pd.add_batch([logits[0], logits[1], logits[2]])
    d = pd.distances()
    assert d.dtype == torch.float32 and d.shape == (3, 3)
    assert torch.allclose(d, torch.tensor(HAND_D), atol=1e-6)

    # Row normalisation: D̂ = d / row sum; scores = -D̂ / 0.1; softmax.
    scores = prediction_scores(d)
    w = trust_from_scores(scores)
    for i in range(3):
        row_sum = sum(HAND_D[i])
        expected = _softmax_row([-(v / row_sum) / 0.1 for v in HAND_D[i]])
        assert w[i].tolist() == pytest.approx(expected, abs=1e-6)
    _assert_rows_sum_to_one(w)


def test_prediction_distance_accepts_stacked_tensor_and_masks_padding() -> None:
    logits = _three_client_batch()
    # Append a third position where the clients disagree wildly, then mask it as padding.
    pad = torch.randn(3, 2, 1, 4) * 100
    padded = torch.cat([logits, pad], dim=2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    pd = PredictionDistance(3, k=2)
    pd.add_batch(padded, attention_mask=mask)
    assert torch.allclose(pd.distances(), torch.tensor(HAND_D), atol=1e-5)


def test_prediction_distance_identical_models_zero_and_accumulation() -> None:
    g = torch.Generator().manual_seed(1)
    same = torch.randn(4, 3, 11, generator=g)  # (B=4, T=3, V=11)
    other = torch.randn(4, 3, 11, generator=g)

    pd = PredictionDistance(3, k=5)
    pd.add_batch([same, same.clone(), other])
    d = pd.distances()
    assert d[0, 1].item() == 0.0 and d[1, 0].item() == 0.0
    assert torch.all(torch.diagonal(d) == 0)
    assert d[0, 2].item() > 0 and torch.allclose(d, d.T)

    # Cross-check one entry against the dense definition.
    dense = (topk_mask_logits(same, 5) - topk_mask_logits(other, 5)).abs().sum() / 4
    assert d[0, 2].item() == pytest.approx(dense.item(), rel=1e-5)

    # Two batches of 2 == one batch of 4 (sum over batches / (n_batches × batch_size)).
    split = PredictionDistance(3, k=5)
    split.add_batch([same[:2], same[:2].clone(), other[:2]])
    split.add_batch([same[2:], same[2:].clone(), other[2:]])
    assert split.n_batches == 2
    assert torch.allclose(split.distances(), d, rtol=1e-5)


def test_prediction_distance_validation() -> None:
    pd = PredictionDistance(2, k=2)
    with pytest.raises(RuntimeError):
        pd.distances()
    with pytest.raises(ValueError, match="2 clients"):
        pd.add_batch([torch.zeros(1, 1, 4)])
    with pytest.raises(ValueError, match="shape"):
        pd.add_batch([torch.zeros(1, 1, 4), torch.zeros(1, 2, 4)])
    with pytest.raises(ValueError, match="attention_mask"):
        pd.add_batch([torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)], attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError):
        PredictionDistance(2, k=0)


def test_prediction_scores_all_zero_row_is_uniform_not_nan() -> None:
    scores = prediction_scores(torch.zeros(3, 3))
    assert torch.equal(scores, torch.zeros(3, 3))
    assert torch.allclose(trust_from_scores(scores), torch.full((3, 3), 1 / 3))


# ---------------------------------------------------------------- selection variants

SCORES = [[0.9, 0.1, 0.6, 0.2], [0.0, 1.0, 0.3, 0.4], [0.7, 0.8, 0.9, 0.6], [-1.0, -2.0, -3.0, -0.5]]


def test_topk_selection() -> None:
    w = trust_from_scores(torch.tensor(SCORES), selection="topk", k=2)
    # row 0 keeps 0.9 and 0.6
    a, b = _softmax_row([0.9, 0.6])
    assert w[0].tolist() == pytest.approx([a, 0.0, b, 0.0], abs=1e-6)
    # row 3 keeps -0.5 (col 3) and -1.0 (col 0)
    a, b = _softmax_row([-1.0, -0.5])
    assert w[3].tolist() == pytest.approx([a, 0.0, 0.0, b], abs=1e-6)
    assert ((w > 0).sum(dim=1) == 2).all()
    assert (w[0, [1, 3]] == 0).all()  # exactly zero, not tiny
    _assert_rows_sum_to_one(w)
    # k larger than N is all peers
    assert torch.allclose(
        trust_from_scores(torch.tensor(SCORES), "topk", k=10), trust_from_scores(torch.tensor(SCORES))
    )
    with pytest.raises(ValueError):
        trust_from_scores(torch.tensor(SCORES), "topk", k=0)


def test_threshold_selection_keeps_two_largest() -> None:
    w = trust_from_scores(torch.tensor(SCORES), selection="threshold", threshold=0.5)
    # row 0: 0.9 and 0.6 pass
    a, b = _softmax_row([0.9, 0.6])
    assert w[0].tolist() == pytest.approx([a, 0.0, b, 0.0], abs=1e-6)
    # row 1: only 1.0 passes; 0.4 is kept as the second largest
    a, b = _softmax_row([1.0, 0.4])
    assert w[1].tolist() == pytest.approx([0.0, a, 0.0, b], abs=1e-6)
    # row 2: all four pass
    assert w[2].tolist() == pytest.approx(_softmax_row(SCORES[2]), abs=1e-6)
    # row 3: none pass; the two largest (-0.5, -1.0) are still kept
    a, b = _softmax_row([-1.0, -0.5])
    assert w[3].tolist() == pytest.approx([a, 0.0, 0.0, b], abs=1e-6)
    assert w[3, 1].item() == 0.0 and w[3, 2].item() == 0.0
    _assert_rows_sum_to_one(w)


def test_all_selection_rows_sum_to_one_and_validation() -> None:
    for selection in ("all", "topk", "threshold"):
        w = trust_from_scores(torch.tensor(SCORES) * 7, selection=selection)
        assert w.dtype == torch.float32 and w.shape == (4, 4)
        _assert_rows_sum_to_one(w)
    with pytest.raises(ValueError, match="selection"):
        trust_from_scores(torch.tensor(SCORES), selection="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="square"):
        trust_from_scores(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        trust_from_scores(torch.tensor([[0.0, float("nan")], [0.0, 0.0]]))


# ---------------------------------------------------------------- oracle


def test_oracle_disjoint_and_identical() -> None:
    m = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(oracle_trust(m), expected)


def test_oracle_partial_overlap_and_counts() -> None:
    # <m0,m0> = 0.5, <m0,m1> = 0.5, <m1,m1> = 1 -> row 0 [1/2, 1/2], row 1 [1/3, 2/3]
    w = oracle_trust(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    assert w.tolist()[0] == pytest.approx([0.5, 0.5])
    assert w.tolist()[1] == pytest.approx([1 / 3, 2 / 3])
    # raw counts give the same answer as proportions
    assert torch.allclose(oracle_trust(torch.tensor([[10.0, 10.0], [7.0, 0.0]])), w)
    with pytest.raises(ValueError, match="all-zero"):
        oracle_trust(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def _dense_distance(logits: list[torch.Tensor], k: int, mask: torch.Tensor) -> torch.Tensor:
    """The definition, on full vocabularies: L_i = client i's top-k logits, 0 elsewhere; Σ |L_i - L_j|."""
    masked = []
    for x in logits:
        values, indices = x.double().topk(k, dim=-1)
        masked.append(torch.zeros_like(x, dtype=torch.float64).scatter_(-1, indices, values))
    n, batch = len(logits), logits[0].shape[0]
    d = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            d[i, j] = ((masked[i] - masked[j]).abs().sum(-1) * mask).sum() / batch
    return d


def test_prediction_distance_from_top_k_alone_equals_the_dense_definition() -> None:
    torch.manual_seed(3)
    logits = [torch.randn(3, 6, 40) for _ in range(4)]
    logits[1][..., :5] = logits[0][..., :5]  # shared top entries, so supports overlap
    mask = torch.ones(3, 6)
    mask[2, 4:] = 0
    pd = PredictionDistance(4, k=7)
    pd.add_topk([x.topk(7, dim=-1) for x in logits], attention_mask=mask)
    torch.testing.assert_close(
        pd.distances().double(), _dense_distance(logits, 7, mask), rtol=1e-6, atol=1e-6
    )


def test_prediction_distance_never_materialises_the_vocabulary() -> None:
    """Top-k indices from a vocabulary of 10^12 entries: a dense (B, T, V) tensor could not exist."""
    g = torch.Generator().manual_seed(0)
    tops = []
    for _ in range(8):
        indices = torch.randint(0, 10**12, (4, 64, 100), generator=g)
        tops.append((torch.randn(4, 64, 100, generator=g), indices))
    tops[1] = (tops[1][0], tops[0][1])  # client 1 shares client 0's support
    pd = PredictionDistance(8, k=100)
    pd.add_topk(tops)
    d = pd.distances()
    assert d.shape == (8, 8) and torch.isfinite(d).all() and d[0, 1] < d[0, 2]
