"""Client-level differential privacy for adapter updates (DP-FedAvg, McMahan et al., ICLR 2018).

Every client's update Delta = upload - reference is clipped to L2 norm <= C (all adapter tensors
taken together), so one client changes a sum of updates by at most C. Gaussian noise of standard
deviation sigma * C (sigma = noise_multiplier) on that sum makes each round a Gaussian mechanism
with respect to adding or removing one client's whole data; for a weighted average with weights w
the noise is sigma * C * max_j w_j. The privacy spent over the rounds (epsilon at a given delta) is
computed by Opacus' RDP accountant with the client sampling rate q = clients asked per round / all
clients (1 in cotune, which asks every client every round, so there is no amplification by sampling).

Pure: the runtime decides where to apply these; the random generator is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from cotune.algorithms.robust import state_norm, update_delta
from cotune.state import AdapterState

__all__ = [
    "add_gaussian_noise",
    "clip_update",
    "clip_uploads",
    "epsilon_spent",
    "noise_std",
]


def clip_update(delta: Mapping[str, Tensor], clip_norm: float) -> tuple[AdapterState, float]:
    """Scale `delta` by min(1, C / ||delta||); returns the clipped update and the original norm."""
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    norm = state_norm(delta)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in delta.items()}, norm


def clip_uploads(
    uploads: Sequence[Mapping[str, Tensor]],
    references: Sequence[Mapping[str, Tensor]],
    clip_norm: float,
) -> tuple[list[AdapterState], list[float]]:
    """reference + clip(upload - reference) for each client, in the upload's dtype; and the norms."""
    out, norms = [], []
    for u, ref in zip(uploads, references, strict=True):
        clipped, norm = clip_update(update_delta(u, ref), clip_norm)
        out.append({k: (ref[k].float() + clipped[k]).to(u[k].dtype) for k in ref})
        norms.append(norm)
    return out, norms


def noise_std(clip_norm: float, noise_multiplier: float, max_weight: float = 1.0) -> float:
    """Standard deviation of the Gaussian noise on a sum whose per-client weight is at most `max_weight`."""
    return noise_multiplier * clip_norm * max_weight


def add_gaussian_noise(
    state: Mapping[str, Tensor], std: float, generator: torch.Generator | None = None
) -> AdapterState:
    """state + N(0, std^2) element-wise (noise drawn in float32 on the CPU, so it is device-independent)."""
    out = {}
    for k, v in state.items():
        noise = torch.randn(v.shape, generator=generator, dtype=torch.float32) * std
        out[k] = (v.float() + noise.to(v.device)).to(v.dtype)
    return out


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon after `steps` rounds of the sampled Gaussian mechanism (Opacus RDP accountant).

    inf without noise; 0 before any round.
    """
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant  # imported lazily: opacus pulls in scipy

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=delta))
