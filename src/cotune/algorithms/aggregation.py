"""Mixing LoRA adapter state dicts: per-client trust mixing and (weighted) averaging.

Every function here is pure: inputs are never modified, outputs are fresh tensors with the
input's dtype and device. Accumulation happens in at least float32 so that bf16/fp16 adapters
do not lose precision while being summed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["check_same_layout", "mix_adapters", "weighted_average"]


def check_same_layout(adapters: Sequence[Mapping[str, Tensor]]) -> list[str]:
    """Check that all adapters share keys and shapes; return the keys in the first adapter's order.

    Mixing tensors of different modules (or ranks) would silently produce garbage, so a
    mismatch is an error naming the offending key and client.
    """
    if len(adapters) == 0:
        raise ValueError("need at least one adapter")
    reference = adapters[0]
    keys = list(reference.keys())
    if not keys:
        raise ValueError("adapter 0 is empty (no tensors)")
    key_set = set(keys)
    for i, adapter in enumerate(adapters[1:], start=1):
        missing = [k for k in keys if k not in adapter]
        if missing:
            raise ValueError(f"adapter {i} is missing key {missing[0]!r} (present in adapter 0)")
        extra = [k for k in adapter if k not in key_set]
        if extra:
            raise ValueError(f"adapter {i} has unexpected key {extra[0]!r} (absent from adapter 0)")
        for key in keys:
            if adapter[key].shape != reference[key].shape:
                raise ValueError(
                    f"key {key!r}: adapter {i} has shape {tuple(adapter[key].shape)} "
                    f"but adapter 0 has {tuple(reference[key].shape)}"
                )
    for key in keys:
        for i, adapter in enumerate(adapters):
            if not adapter[key].is_floating_point():
                raise ValueError(f"key {key!r}: adapter {i} has non-floating dtype {adapter[key].dtype}")
    return keys


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, float64 stays float64: never accumulate below the input's precision."""
    return torch.promote_types(dtype, torch.float32)


def _mix(adapters: Sequence[Mapping[str, Tensor]], matrix: Tensor) -> list[dict[str, Tensor]]:
    """out[i][key] = Σ_j matrix[i, j] · adapters[j][key], computed as one matmul per key.

    Clients with the same row (every client under FedAvg) share one output dict: N simulated clients
    then hold one copy of the average, not N. Nothing downstream changes an adapter in place."""
    keys = check_same_layout(adapters)
    n = len(adapters)
    if matrix.ndim != 2 or matrix.shape[1] != n:
        raise ValueError(f"mixing matrix must have shape (*, {n}), got {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError("mixing matrix contains NaN or inf")
    first_of: dict[tuple[float, ...], int] = {}
    rows = [first_of.setdefault(tuple(float(x) for x in row), i) for i, row in enumerate(matrix)]
    outputs: dict[int, dict[str, Tensor]] = {i: {} for i in sorted(set(rows))}
    for key in keys:
        ref = adapters[0][key]
        acc_dtype = _accumulation_dtype(ref.dtype)
        # (N, numel) stack on the first client's device; matmul with an exact 0/1 matrix is exact.
        stacked = torch.stack(
            [a[key].detach().to(device=ref.device, dtype=acc_dtype).reshape(-1) for a in adapters]
        )
        mixed = matrix.to(device=ref.device, dtype=acc_dtype) @ stacked
        for i, out in outputs.items():
            out[key] = mixed[i].reshape(ref.shape).to(dtype=ref.dtype).clone()
    return [outputs[i] for i in rows]


def mix_part(adapters: Sequence[Mapping[str, Tensor]], trust: Tensor, part: str) -> list[dict[str, Tensor]]:
    """θ_i ← Σ_j W_ij θ_j on the tensors whose key names `part` ("lora_A" or "lora_B"); every other tensor
    stays client i's own (FedSA-LoRA shares A, FFA-LoRA shares B)."""
    shared = [{k: v for k, v in a.items() if part in k} for a in adapters]
    if not shared or not shared[0]:
        raise ValueError(f"no {part} tensors in the adapters to share")
    mixed = mix_adapters(shared, trust)
    return [
        {**{k: v.clone() for k, v in own.items() if part not in k}, **m}
        for own, m in zip(adapters, mixed, strict=True)
    ]


def mix_adapters(adapters: Sequence[Mapping[str, Tensor]], trust: Tensor) -> list[dict[str, Tensor]]:
    """Personalised aggregation θ_i ← Σ_j W_ij θ_j, element-wise on every tensor (A and B separately).

    ``trust`` is the N×N (row-stochastic) trust matrix; with W = I every client gets back an
    exact copy of its own adapter.
    """
    n = len(adapters)
    if trust.ndim != 2 or trust.shape[0] != trust.shape[1]:
        raise ValueError(f"trust matrix must be square, got shape {tuple(trust.shape)}")
    if trust.shape[0] != n:
        raise ValueError(f"trust matrix is {trust.shape[0]}×{trust.shape[1]} but there are {n} adapters")
    return _mix(adapters, trust.detach())


def weighted_average(
    adapters: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | Tensor | None = None
) -> dict[str, Tensor]:
    """One global adapter Σ_j w_j θ_j / Σ_j w_j, as in FedAvg / FedCoLLM (weights = example counts).

    ``None`` means uniform weights. Weights are normalised here so callers can pass raw counts.
    """
    n = len(adapters)
    if n == 0:
        raise ValueError("need at least one adapter")
    w = (
        torch.ones(n, dtype=torch.float64)
        if weights is None
        else torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
    )
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(f"expected {n} weights (one per adapter), got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise ValueError("weights sum to zero")
    return _mix(adapters, (w / total).unsqueeze(0))[0]
