"""Client-level differential privacy for adapter updates (DP-FedAvg, McMahan et al., ICLR 2018).

Every client's update Delta = upload - reference is clipped to L2 norm <= C (all adapter tensors
taken together), so one client changes a sum of updates by at most C. Gaussian noise of standard
deviation sigma * C (sigma = noise_multiplier) on that sum makes each round a Gaussian mechanism
with respect to adding or removing one client's whole data; for a weighted average with weights w
the noise is sigma * C * max_j w_j. The privacy spent over the rounds (epsilon at a given delta) is
computed by Opacus' RDP accountant with the client sampling rate q = clients asked per round / all
clients (1 in cotune, which asks every client every round, so there is no amplification by sampling).

**Protected trust evidence** (prediction trust, `privacy.evidence_clip` / `evidence_noise_multiplier`):
the top-k logits a client uploads on the public set are a second release of its data each round, made
by the client itself before they leave it. Its support (which k tokens) is taken from the base model
without the adapter, the same for every client and computable by anyone, so only the values depend on
the client's data; each position's k values are centred on their mean (logits are shift-invariant:
the offset carries nothing and would spend the bound) and clipped to L2 norm <= C_e / sqrt(P), P the
positions of the round's release, so the whole release has L2 norm <= C_e; Gaussian noise of std
sigma_e * C_e on every value makes it a Gaussian mechanism of noise multiplier sigma_e, with the
sensitivity C_e taken as for an adapter update (adding or removing the client's data). Both releases
of a round happen together, to the same sampled clients, and the concatenation of two Gaussian
mechanisms of multipliers sigma_a and sigma_e is one of multiplier (sigma_a^-2 + sigma_e^-2)^-1/2
(`composed_noise_multiplier`), which the accountant charges once per round.

Pure: the runtime decides where to apply these; the random generator is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cotune.algorithms.robust import state_norm, update_delta
from cotune.config.schema import ExperimentConfig
from cotune.seeds import fresh_generator, torch_generator
from cotune.state import AdapterState

__all__ = [
    "EvidenceProtection",
    "add_gaussian_noise",
    "clip_positions",
    "clip_update",
    "clip_uploads",
    "composed_noise_multiplier",
    "epsilon_spent",
    "noise_std",
    "protect_topk",
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


def composed_noise_multiplier(*multipliers: float) -> float:
    """The noise multiplier of the Gaussian mechanisms `multipliers` (each of sensitivity its clip bound,
    noise multiplier x bound) released together: (sum sigma_i^-2)^-1/2, their RDP being alpha / (2 sigma_i^2)
    each and adding up; 0 (no guarantee) when any is 0."""
    if not multipliers:
        raise ValueError("no mechanism to compose")
    if min(multipliers) <= 0:
        return 0.0
    return sum(s**-2 for s in multipliers) ** -0.5


def clip_positions(values: Tensor, bound: float) -> Tensor:
    """Each position's values (the last dim) minus their mean, scaled to L2 norm <= `bound`."""
    if bound <= 0:
        raise ValueError(f"bound must be positive, got {bound}")
    centred = values.float() - values.float().mean(-1, keepdim=True)
    norms = torch.linalg.vector_norm(centred, dim=-1, keepdim=True)
    return centred * (bound / norms.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)


def protect_topk(
    values: Sequence[Tensor], clip: float, noise_multiplier: float, generator: torch.Generator | None = None
) -> list[Tensor]:
    """A client's top-k values of one round's release (its batches, each (..., k)), protected: each
    position clipped to C / sqrt(P) (`clip_positions`, P the positions of all batches), so the release
    has L2 norm <= C, then N(0, (noise_multiplier * C)^2) on every value (`add_gaussian_noise`)."""
    positions = sum(v.numel() // v.shape[-1] for v in values if v.numel())
    bound = clip / math.sqrt(max(positions, 1))
    std = noise_std(clip, noise_multiplier)
    return [add_gaussian_noise({"v": clip_positions(v, bound)}, std, generator)["v"] for v in values]


@dataclass(frozen=True)
class EvidenceProtection:
    """How a client protects the top-k logits it uploads for prediction trust (`protect_topk`): the L2
    bound of a round's release, its noise multiplier, and the seed of its noise (None: fresh OS entropy)."""

    clip: float
    noise_multiplier: float = 0.0
    seed: int | None = None

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> EvidenceProtection | None:
        """The run's `privacy.evidence_clip`, where its strategy uploads logits (None: unprotected)."""
        p = cfg.privacy
        if p.evidence_clip is None or not cfg.uploads_logits:
            return None
        return cls(p.evidence_clip, p.evidence_noise_multiplier, p.seed)

    def generator(self, at: tuple[object, ...]) -> torch.Generator:
        """The noise of one release, an instance of the `privacy` stream: `at` is (round, ("evidence",
        client)) for a client's upload in a round."""
        if self.seed is None:
            return fresh_generator()
        return torch_generator("privacy", self.seed, *at)

    def protect(self, values: Sequence[Tensor], at: tuple[object, ...]) -> list[Tensor]:
        """`protect_topk` of one release, its noise the instance `at` of the `privacy` stream."""
        return protect_topk(values, self.clip, self.noise_multiplier, self.generator(at))
