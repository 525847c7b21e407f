"""Defences at the aggregation point: update screening and robust averaging.

Pure functions on adapter state dicts. A client's *update* is its upload minus the reference it
started the round from (its own last adapter in personalized fine-tuning, the broadcast theta in
FedCoLLM). `screen_updates` rejects uploads that are malformed (wrong keys or shapes, non-float),
non-finite, or whose update norm exceeds a bound; `robust_average` replaces the mean of FedAvg by
the coordinate-wise median or trimmed mean (Yin et al., 2018), which tolerate a minority of
arbitrary (Byzantine) uploads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from cotune.algorithms.aggregation import check_same_layout, weighted_average
from cotune.config.names import Aggregator
from cotune.state import AdapterState

__all__ = [
    "AGGREGATORS",
    "check_update",
    "coordinate_median",
    "robust_average",
    "screen_updates",
    "state_norm",
    "trimmed_mean",
    "update_delta",
]


def update_delta(upload: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> AdapterState:
    """upload - reference, key by key, in at least float32."""
    return {
        k: upload[k].detach().float() - reference[k].detach().to(upload[k].device).float() for k in reference
    }


def state_norm(state: Mapping[str, Tensor]) -> float:
    """The L2 norm of all tensors of a state dict taken together (as one flat vector)."""
    total = sum(float(t.detach().double().pow(2).sum()) for t in state.values())
    return math.sqrt(total)


def check_update(
    upload: Mapping[str, Tensor], reference: Mapping[str, Tensor], max_norm: float | None = None
) -> str | None:
    """Why `upload` must not be aggregated, or None if it may be.

    Checks, in order: exactly the reference's keys, the same shapes, floating-point tensors, only
    finite values, and (when `max_norm` is given) ||upload - reference||_2 <= max_norm.
    """
    extra = sorted(set(upload) - set(reference))
    if extra:
        return f"unexpected key {extra[0]!r}"
    missing = sorted(set(reference) - set(upload))
    if missing:
        return f"missing key {missing[0]!r}"
    for k, ref in reference.items():
        t = upload[k]
        if not isinstance(t, Tensor):
            return f"key {k!r} is not a tensor ({type(t).__name__})"
        if t.shape != ref.shape:
            return f"key {k!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
        if not t.is_floating_point():
            return f"key {k!r} has non-floating dtype {t.dtype}"
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            return f"key {k!r} has {bad} non-finite value(s) (NaN/Inf)"
    if max_norm is not None:
        norm = state_norm(update_delta(upload, reference))
        if norm > max_norm:
            return f"update norm {norm:.4g} exceeds max_update_norm {max_norm:g}"
    return None


def screen_updates(
    uploads: Sequence[Mapping[str, Tensor]],
    references: Sequence[Mapping[str, Tensor]],
    max_norm: float | None = None,
) -> tuple[list[int], list[tuple[int, str]]]:
    """Split uploads into accepted positions and (position, reason) rejections."""
    if len(uploads) != len(references):
        raise ValueError(f"{len(uploads)} uploads but {len(references)} references")
    accepted, rejected = [], []
    for i, (u, ref) in enumerate(zip(uploads, references, strict=True)):
        reason = check_update(u, ref, max_norm)
        if reason is None:
            accepted.append(i)
        else:
            rejected.append((i, reason))
    return accepted, rejected


def _robust(adapters: Sequence[Mapping[str, Tensor]], trim: int) -> AdapterState:
    """Mean of the coordinate-wise sorted values with `trim` dropped at each end (trim=-1: median)."""
    keys = check_same_layout(adapters)
    n = len(adapters)
    out: AdapterState = {}
    for key in keys:
        ref = adapters[0][key]
        acc = torch.promote_types(ref.dtype, torch.float32)
        stacked = torch.stack([a[key].detach().to(device=ref.device, dtype=acc) for a in adapters])
        ordered = stacked.sort(dim=0).values
        if trim < 0:  # median: the middle value, or the mean of the two middle values
            lo, hi = (n - 1) // 2, n // 2
            value = (ordered[lo] + ordered[hi]) / 2
        else:
            value = ordered[trim : n - trim].mean(dim=0)
        out[key] = value.to(ref.dtype)
    return out


def coordinate_median(adapters: Sequence[Mapping[str, Tensor]]) -> AdapterState:
    """Element-wise median over clients (mean of the two middle values for an even count)."""
    if not adapters:
        raise ValueError("need at least one adapter")
    return _robust(adapters, -1)


def trimmed_mean(adapters: Sequence[Mapping[str, Tensor]], trim_fraction: float) -> AdapterState:
    """Element-wise mean after dropping the floor(trim_fraction * n) largest and smallest values."""
    n = len(adapters)
    if n == 0:
        raise ValueError("need at least one adapter")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    return _robust(adapters, math.floor(trim_fraction * n))


def mean_of(
    adapters: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None, trim_fraction: float
) -> AdapterState:
    """The (weighted) mean: plain FedAvg."""
    return weighted_average(adapters, weights)


def median_of(
    adapters: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None, trim_fraction: float
) -> AdapterState:
    """The coordinate-wise median (ignores the weights)."""
    return coordinate_median(adapters)


def trimmed_mean_of(
    adapters: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None, trim_fraction: float
) -> AdapterState:
    """The coordinate-wise trimmed mean (ignores the weights)."""
    return trimmed_mean(adapters, trim_fraction)


# (adapters, weights or None for uniform, trim_fraction) -> the aggregate
AggregatorFn = Callable[[Sequence[Mapping[str, Tensor]], Sequence[float] | None, float], AdapterState]
# One row per robustness.aggregator name (config.names.Aggregator; tests/test_vocabulary.py checks it).
AGGREGATORS: dict[Aggregator, AggregatorFn] = {
    "mean": mean_of,
    "median": median_of,
    "trimmed_mean": trimmed_mean_of,
}


def robust_average(
    adapters: Sequence[Mapping[str, Tensor]],
    aggregator: Aggregator = "mean",
    trim_fraction: float = 0.1,
    weights: Sequence[float] | None = None,
) -> AdapterState:
    """The FedAvg step with the configured aggregator; median and trimmed mean ignore `weights`."""
    if aggregator not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {aggregator!r}; expected {', '.join(AGGREGATORS)}")
    return AGGREGATORS[aggregator](adapters, weights, trim_fraction)
