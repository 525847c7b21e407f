"""Aggregating LoRA adapters of different ranks (clients on different hardware).

A rank-r adapter holds, per adapted module, A (r x in) and B (out x r); its weight update is
s * B A with one scale s for every client (cotune keeps alpha / r fixed across ranks), so adapters
of different ranks are compared through their products. Two published rules:

- HetLoRA (Cho et al., arXiv 2401.06432): zero-pad every A and B to the largest rank, average them
  weighted by the Frobenius norm of each client's update B A ("sparsity-weighted"), and give each
  client the first r_i ranks of the average back.
- FlexLoRA (Bai et al., arXiv 2402.11505): average the products B A themselves (a full-rank update),
  then give each client the best rank-r_i approximation of it (truncated SVD), split evenly between B
  and A: B = U sqrt(S), A = sqrt(S) V^T.
- FLoRA (Wang et al., arXiv 2409.05976): stack the clients' factors, B = [w_1 B_1 ... w_K B_K] and
  A = [A_1; ...; A_K], so that B A = sum_k w_k B_k A_k exactly, at rank sum_k r_k; every client merges
  that update into its base weights and starts a fresh LoRA (`flora_stack`, `rank_slice`).
- FedEx-LoRA (Singhal et al., arXiv 2410.09432): average A and B (as FedAvg does) and fold the residual
  sum_k w_k B_k A_k - B_mean A_mean into the base weights, so that base + B_mean A_mean is the exact
  average of the products; the residual is FLoRA's stack with -B_mean A_mean appended (`fedex_stack`).

The SVD of sum_j w_j B_j A_j never forms the out x in matrix: stacking the B_j side by side and the A_j
on top of each other (FLoRA's construction, arXiv 2409.05976) gives the same product with inner
dimension sum_j r_j, and two thin QR factorisations reduce the SVD to that small size.
Pure functions on state dicts in peft's key format; inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from cotune.algorithms.aggregation import mix_adapters
from cotune.state import AdapterState

__all__ = [
    "fedex_stack",
    "flexlora_mix",
    "flora_stack",
    "hetlora_mix",
    "hetlora_weights",
    "lora_pairs",
    "rank_of",
    "rank_slice",
    "resize_rank",
]

A_PART, B_PART = "lora_A", "lora_B"


def lora_pairs(state: Mapping[str, Tensor]) -> dict[str, tuple[str, str]]:
    """Each adapted module's (A key, B key), by the module's name."""
    pairs: dict[str, tuple[str, str]] = {}
    for key in state:
        if f".{A_PART}." in key:
            module = key.split(f".{A_PART}.")[0]
            b_key = key.replace(f".{A_PART}.", f".{B_PART}.")
            if b_key not in state:
                raise ValueError(f"adapter has {key!r} but no matching {B_PART} tensor")
            pairs[module] = (key, b_key)
    if not pairs:
        raise ValueError("adapter has no LoRA A/B tensors")
    return pairs


def rank_of(state: Mapping[str, Tensor]) -> int:
    """The adapter's rank (the rows of its A matrices, which must agree)."""
    ranks = {state[a].shape[0] for a, _ in lora_pairs(state).values()}
    if len(ranks) != 1:
        raise ValueError(f"adapter mixes ranks {sorted(ranks)} across its modules")
    return ranks.pop()


def resize_rank(state: Mapping[str, Tensor], rank: int) -> AdapterState:
    """The same adapter at `rank`: its first `rank` components, or zero-padded up to `rank` (both keep
    B A unchanged when no nonzero component is cut)."""
    out: AdapterState = {k: v.clone() for k, v in state.items()}
    for a_key, b_key in lora_pairs(state).values():
        a, b = state[a_key], state[b_key]
        have = a.shape[0]
        if rank <= have:
            out[a_key], out[b_key] = a[:rank].clone(), b[:, :rank].clone()
        else:
            out[a_key] = torch.cat([a, a.new_zeros(rank - have, a.shape[1])])
            out[b_key] = torch.cat([b, b.new_zeros(b.shape[0], rank - have)], dim=1)
    return out


def rank_slice(state: Mapping[str, Tensor], start: int, stop: int) -> AdapterState:
    """Components start..stop-1 of an adapter (rows of A, columns of B), e.g. one round of a stacked
    FLoRA update or a client's own part of a saved stack."""
    out: AdapterState = {k: v.clone() for k, v in state.items()}
    for a_key, b_key in lora_pairs(state).values():
        out[a_key] = state[a_key][start:stop].clone()
        out[b_key] = state[b_key][:, start:stop].clone()
    return out


def flora_stack(
    adapters: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None
) -> AdapterState:
    """FLoRA's aggregate: B = [w_1 B_1 ... w_K B_K], A = [A_1; ...; A_K], so B A = sum_k w_k B_k A_k with no
    approximation, whatever the ranks (weights default to 1: stacking a merged history and a new round)."""
    if not adapters:
        raise ValueError("nothing to stack")
    w = [1.0] * len(adapters) if weights is None else [float(x) for x in weights]
    if len(w) != len(adapters):
        raise ValueError(f"{len(w)} weights for {len(adapters)} adapters")
    out: AdapterState = {k: v.clone() for k, v in adapters[0].items()}
    for a_key, b_key in lora_pairs(adapters[0]).values():
        out[a_key] = torch.cat([a[a_key] for a in adapters], 0)
        out[b_key] = torch.cat([x * a[b_key] for x, a in zip(w, adapters, strict=True)], 1)
    return out


def fedex_stack(adapters: Sequence[Mapping[str, Tensor]], trust: Tensor) -> AdapterState:
    """FedEx-LoRA's exact aggregate for W's first row w, as one stacked adapter: the residual
    sum_k w_k B_k A_k - B_mean A_mean (FLoRA's factors of the clients, then -B_mean over A_mean), then the
    averaged adapter itself (A and B mixed apart, as FedAvg does: its last r components). Its product is
    sum_k w_k B_k A_k with no approximation; the round loop merges all but the last r into the base."""
    mean = mix_adapters(adapters, trust)[0]
    weights = [float(x) for x in trust[0]]
    return flora_stack([*adapters, mean, mean], [*weights, -1.0, 1.0])


def update_norm(state: Mapping[str, Tensor]) -> float:
    """||B A||_F over all modules together, from r x r Gram matrices (never the out x in product)."""
    total = 0.0
    for a_key, b_key in lora_pairs(state).values():
        a, b = state[a_key].double(), state[b_key].double()
        total += float(((b.T @ b) * (a @ a.T)).sum())  # trace(B^T B A A^T)
    return max(total, 0.0) ** 0.5


def hetlora_weights(adapters: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """HetLoRA's sparsity weights: each client's share of sum_k ||B_k A_k||_F (uniform if all are zero)."""
    norms = torch.tensor([update_norm(a) for a in adapters], dtype=torch.float64)
    if not torch.isfinite(norms).all():
        raise ValueError("an adapter's update norm is not finite")
    total = norms.sum()
    return norms / total if total > 0 else torch.full_like(norms, 1.0 / len(adapters))


def hetlora_mix(adapters: Sequence[Mapping[str, Tensor]], trust: Tensor) -> list[AdapterState]:
    """theta_i <- the first r_i ranks of sum_j W_ij pad(theta_j): A and B mixed apart, at the largest rank."""
    ranks = [rank_of(a) for a in adapters]
    top = max(ranks)
    mixed = mix_adapters([resize_rank(a, top) for a in adapters], trust)
    return [resize_rank(m, r) for m, r in zip(mixed, ranks, strict=True)]


def flexlora_mix(adapters: Sequence[Mapping[str, Tensor]], trust: Tensor) -> list[AdapterState]:
    """theta_i <- the best rank-r_i factors of sum_j W_ij B_j A_j (one SVD per distinct row of W)."""
    n = len(adapters)
    if trust.shape != (n, n):
        raise ValueError(f"trust matrix is {tuple(trust.shape)} but there are {n} adapters")
    ranks = [rank_of(a) for a in adapters]
    pairs = lora_pairs(adapters[0])
    outputs: list[AdapterState] = [{k: v.clone() for k, v in a.items()} for a in adapters]
    rows: dict[tuple[float, ...], list[int]] = {}
    for i in range(n):
        rows.setdefault(tuple(float(x) for x in trust[i]), []).append(i)
    for row, clients in rows.items():
        top = max(ranks[i] for i in clients)
        for a_key, b_key in pairs.values():
            b_top, a_top = _top_factors([a[b_key] for a in adapters], [a[a_key] for a in adapters], row, top)
            for i in clients:
                ref_a, ref_b = adapters[i][a_key], adapters[i][b_key]
                outputs[i][a_key] = a_top[: ranks[i]].to(ref_a.dtype).to(ref_a.device).contiguous()
                outputs[i][b_key] = b_top[:, : ranks[i]].to(ref_b.dtype).to(ref_b.device).contiguous()
    return outputs


def _top_factors(
    bs: Sequence[Tensor], as_: Sequence[Tensor], weights: Sequence[float], rank: int
) -> tuple[Tensor, Tensor]:
    """(B, A) with B A the best rank-`rank` approximation of sum_j w_j B_j A_j, zero-padded when the sum
    has lower rank. Computed in float64 on the first tensor's device."""
    device = bs[0].device
    b_cat = torch.cat([w * b.detach().to(device, torch.float64) for w, b in zip(weights, bs, strict=True)], 1)
    a_cat = torch.cat([a.detach().to(device, torch.float64) for a in as_], 0)
    q_b, r_b = torch.linalg.qr(b_cat)  # out x k, k x R
    q_a, r_a = torch.linalg.qr(a_cat.T)  # in x k', k' x R
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    keep = min(rank, s.shape[0])
    root = s[:keep].sqrt()
    b = torch.zeros(b_cat.shape[0], rank, dtype=torch.float64, device=device)
    a = torch.zeros(rank, a_cat.shape[1], dtype=torch.float64, device=device)
    b[:, :keep] = (q_b @ u[:, :keep]) * root
    a[:keep] = root[:, None] * (vh[:keep] @ q_a.T)
    return b, a
