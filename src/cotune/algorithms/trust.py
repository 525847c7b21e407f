"""Trust matrices for personalised aggregation: who should listen to whom, and how much.

A trust matrix W is N×N with rows summing to 1; client i's adapter becomes Σ_j W_ij θ_j.
Score-based strategies (weight similarity, validation perplexity, prediction similarity) first
produce a score matrix (already divided by τ) and then turn each row into weights with
:func:`trust_from_scores`, optionally restricted to the top-k or above-threshold peers.

Everything is a pure function on tensors; results are float32 N×N on CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from cotune.algorithms.aggregation import check_same_layout
from cotune.config.names import Selection

__all__ = [
    "PredictionDistance",
    "identity_trust",
    "oracle_trust",
    "prediction_scores",
    "similarity_scores",
    "topk_mask_logits",
    "trust_from_scores",
    "uniform_trust",
    "validation_scores",
    "weight_similarity",
]

# Same eps as torch.nn.functional.cosine_similarity: each norm is clamped to it, so zero vectors give 0.
_COSINE_EPS = 1e-8
# The threshold selection always keeps at least this many peers, so a row never collapses to one client.
_THRESHOLD_MIN_KEEP = 2


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"number of clients must be >= 1, got {n}")


def _check_square(matrix: Tensor, name: str) -> None:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be a square N×N matrix, got shape {tuple(matrix.shape)}")
    if matrix.shape[0] < 1:
        raise ValueError(f"{name} must have at least one client")


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")


def _finish(matrix: Tensor) -> Tensor:
    return matrix.to(device="cpu", dtype=torch.float32).contiguous()


def identity_trust(n: int) -> Tensor:
    """Local training: every client only trusts itself (W = I)."""
    _check_n(n)
    return torch.eye(n, dtype=torch.float32)


def uniform_trust(n: int) -> Tensor:
    """FedAvg-style: every client trusts every client equally (W_ij = 1/N)."""
    _check_n(n)
    return torch.full((n, n), 1.0 / n, dtype=torch.float32)


def _is_lora_matrix(key: str) -> bool:
    """A and B matrices of peft LoRA layers (linear and embedding variants), not DoRA magnitudes etc."""
    return any(tag in key for tag in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"))


def weight_similarity(adapters: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """S_ij: mean cosine between corresponding rows of the LoRA matrices of clients i and j.

    Rows follow the reference layout A: (in × r), B: (r × out). In peft's layout (lora_A is
    r × in, lora_B is out × r) those rows are the columns, so cosines run along dim 0 and a
    module contributes in + r values. All values of all modules are pooled into one mean, so
    larger modules weigh more. Zero vectors (fresh B) give cosine 0, never NaN; hence S_ii < 1
    while some B is still zero.
    """
    keys = [k for k in check_same_layout(adapters) if _is_lora_matrix(k)]
    if not keys:
        raise ValueError("no LoRA matrices (keys containing 'lora_A'/'lora_B') found in the adapters")
    n = len(adapters)
    total = torch.zeros(n, n, dtype=torch.float64)
    count = 0
    for key in keys:
        ref = adapters[0][key]
        if ref.ndim != 2:
            raise ValueError(f"key {key!r}: expected a 2-D LoRA matrix, got shape {tuple(ref.shape)}")
        stacked = torch.stack([a[key].detach().to(device="cpu", dtype=torch.float64) for a in adapters])
        # (N, rows, cols): unit-normalise every column, like cosine_similarity clamps each norm to eps.
        norms = torch.linalg.vector_norm(stacked, dim=1, keepdim=True).clamp_min(_COSINE_EPS)
        unit = stacked / norms
        total += torch.einsum("irc,jrc->ij", unit, unit)
        count += ref.shape[1]
    return _finish(total / count)


def topk_mask_logits(logits: Tensor, k: int) -> Tensor:
    """Keep exactly the k largest entries of the last dim and zero the rest.

    Focuses prediction similarity on the tokens a model actually considers, ignoring the long
    tail of the vocabulary. Ties at the k-th value are broken by torch.topk (exactly k kept).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if logits.ndim < 1:
        raise ValueError("logits must have at least one dimension")
    if k >= logits.shape[-1]:
        return logits.clone()
    values, indices = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter_(-1, indices, values)


class PredictionDistance:
    """Accumulates d_ij = Σ |L_i − L_j| (top-k masked logits) over batches of a shared reference set.

    Works on each client's top-k (values, indices) alone (`add_topk`, what clients send), so memory
    is O(N·B·T·k), never N×B×T×V; `add_batch` takes full logits and keeps only their top-k.
    """

    def __init__(self, n_clients: int, k: int = 100) -> None:
        _check_n(n_clients)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.n_clients = n_clients
        self.k = k
        self._sum = torch.zeros(n_clients, n_clients, dtype=torch.float64)
        self._n_batches = 0
        self._n_sequences = 0

    @property
    def n_batches(self) -> int:
        """Number of batches accumulated so far."""
        return self._n_batches

    def add_batch(self, logits: Sequence[Tensor] | Tensor, attention_mask: Tensor | None = None) -> None:
        """Add one batch: ``logits[i]`` is client i's (B, T, V) output on the same input batch.

        ``attention_mask`` (B, T), if given, excludes positions where it is 0 (padding).
        """
        if len(logits) != self.n_clients:
            raise ValueError(f"expected logits from {self.n_clients} clients, got {len(logits)}")
        shape = logits[0].shape
        if len(shape) != 3:
            raise ValueError(f"each client's logits must be (batch, seq, vocab), got shape {tuple(shape)}")
        for i in range(1, self.n_clients):
            if logits[i].shape != shape:
                raise ValueError(
                    f"client {i} logits have shape {tuple(logits[i].shape)}, client 0 has {tuple(shape)}"
                )
        k = min(self.k, shape[-1])
        self.add_topk([logits[i].detach().topk(k, dim=-1) for i in range(self.n_clients)], attention_mask)

    def add_topk(self, tops: Sequence[tuple[Tensor, Tensor]], attention_mask: Tensor | None = None) -> None:
        """Add one batch from each client's top-k only: ``tops[i]`` = (values, indices), each (B, T, k).

        What a client sends for prediction trust: the masked L_i is zero off its top-k, so this gives
        exactly the distances of the full logits in O(N·B·T·k) memory (O(B·T·k²) per pair), never
        B·T·V. L_i at j's support is found by matching indices, not by scattering into the vocabulary.
        """
        if len(tops) != self.n_clients:
            raise ValueError(f"expected top-k from {self.n_clients} clients, got {len(tops)}")
        batch, seq, _ = tops[0][0].shape
        if any(tuple(v.shape[:2]) != (batch, seq) or v.shape != ix.shape for v, ix in tops):
            raise ValueError("every client's top-k values and indices must be (batch, seq, k) of one batch")
        weight: Tensor | None = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, seq):
                raise ValueError(
                    f"attention_mask must have shape {(batch, seq)}, got {tuple(attention_mask.shape)}"
                )
            weight = (attention_mask.detach().cpu() != 0).to(torch.float64)
        # float32 at least on the device (no float64 there: not every accelerator has it); the
        # per-position results are small and are summed in float64 on the CPU.
        acc = torch.promote_types(tops[0][0].dtype, torch.float32)
        device = tops[0][0].device
        tops = [(v.to(device=device, dtype=acc), ix.to(device)) for v, ix in tops]
        abs_mass = [values.abs().sum(-1) for values, _ in tops]  # ‖L_i‖₁ per position
        for i in range(self.n_clients - 1):
            values_i, indices_i = tops[i]
            for j in range(i + 1, self.n_clients):
                values_j, indices_j = tops[j]
                # L_i at j's support (0 where outside i's top-k); off j's support |L_i − L_j| = |L_i|.
                same = indices_j.unsqueeze(-1) == indices_i.unsqueeze(-2)  # (B, T, k_j, k_i)
                li_on_j = (same * values_i.unsqueeze(-2)).sum(-1)
                on_support = (li_on_j - values_j).abs().sum(-1)
                off_support = abs_mass[i] - li_on_j.abs().sum(-1)
                per_position = (on_support + off_support).cpu().to(torch.float64)
                if weight is not None:
                    per_position = per_position * weight
                d = per_position.sum()
                self._sum[i, j] += d
                self._sum[j, i] += d
        self._n_batches += 1
        self._n_sequences += batch

    def distances(self) -> Tensor:
        """d_ij divided by the number of sequences seen (n_batches × batch_size for a fixed batch size)."""
        if self._n_batches == 0:
            raise RuntimeError("no batches added yet")
        return _finish((self._sum / self._n_sequences).clamp_min(0.0))


def prediction_scores(distances: Tensor, tau: float = 0.1) -> Tensor:
    """Scores −D̂/τ, with D̂ the distance matrix normalised so each row sums to 1.

    Row normalisation makes the scale of the logits irrelevant. A row that is all zero (every
    model predicts identically to client i) gets all-zero scores, i.e. uniform trust, not NaN.
    """
    _check_square(distances, "distances")
    _check_tau(tau)
    d = distances.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(d).all() or (d < 0).any():
        raise ValueError("distances must be finite and non-negative")
    row_sums = d.sum(dim=1, keepdim=True)
    normalised = torch.where(row_sums > 0, d / row_sums.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return _finish(-normalised / tau)


def validation_scores(perplexity: Tensor, tau: float = 1.0) -> Tensor:
    """Scores −P/τ, where P_ij is the perplexity of client j's model on client i's validation data."""
    _check_square(perplexity, "perplexity")
    _check_tau(tau)
    p = perplexity.detach().to(device="cpu", dtype=torch.float64)
    if torch.isnan(p).any():
        raise ValueError("perplexity contains NaN")
    return _finish(-p / tau)


def similarity_scores(similarity: Tensor, tau: float = 1.0) -> Tensor:
    """Scores S/τ for the weight-similarity strategy."""
    _check_square(similarity, "similarity")
    _check_tau(tau)
    s = similarity.detach().to(device="cpu", dtype=torch.float64)
    if torch.isnan(s).any():
        raise ValueError("similarity contains NaN")
    return _finish(s / tau)


def trust_from_scores(
    scores: Tensor, selection: Selection = "all", k: int = 3, threshold: float = 0.0
) -> Tensor:
    """Row-wise softmax of the scores, over all peers or only the selected ones (others get exactly 0).

    - ``"all"``: plain softmax.
    - ``"topk"``: softmax over the k largest scores of each row (k is capped at N).
    - ``"threshold"``: softmax over scores strictly above ``threshold``, always keeping the 2
      largest so that a client never ends up alone just because every score is low.
    """
    _check_square(scores, "scores")
    s = scores.detach().to(device="cpu", dtype=torch.float64)
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN")
    n = s.shape[0]
    if selection == "all":
        keep = torch.ones_like(s, dtype=torch.bool)
    elif selection == "topk":
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        keep = _largest_mask(s, min(k, n))
    elif selection == "threshold":
        keep = (s > threshold) | _largest_mask(s, min(_THRESHOLD_MIN_KEEP, n))
    else:
        raise ValueError(f"unknown selection {selection!r}; expected 'all', 'topk' or 'threshold'")
    masked = s.masked_fill(~keep, float("-inf"))
    if torch.isneginf(masked).all(dim=1).any():
        raise ValueError("a row has no finite score among the selected peers")
    weights = torch.softmax(masked, dim=1)
    return _finish(weights)


def _largest_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of the k largest entries of each row (exactly k; ties broken by torch.topk)."""
    indices = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, indices, True)


def oracle_trust(mixtures: Tensor) -> Tensor:
    """Upper-bound trust from known data mixtures: W_ij ∝ ⟨m_i, m_j⟩, normalised per row.

    ``mixtures`` is N×L (row i: client i's label proportions). Rows are first normalised to
    proportions, so raw label counts give the same answer. Clients with disjoint labels get 0;
    clients with identical mixtures get equal weight.
    """
    if mixtures.ndim != 2 or mixtures.shape[0] < 1 or mixtures.shape[1] < 1:
        raise ValueError(f"mixtures must be an N×L matrix, got shape {tuple(mixtures.shape)}")
    m = mixtures.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(m).all() or (m < 0).any():
        raise ValueError("mixtures must be finite and non-negative")
    totals = m.sum(dim=1, keepdim=True)
    empty = (totals.squeeze(1) <= 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"client(s) {empty} have an all-zero mixture")
    proportions = m / totals
    overlap = proportions @ proportions.T
    return _finish(overlap / overlap.sum(dim=1, keepdim=True))
