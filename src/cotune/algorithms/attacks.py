"""Malicious clients for simulations: what an attacker uploads instead of its honest update.

Pure functions. With Delta = honest upload - reference (the adapter the client started the round
from), an attacker uploads:

* `noise`: reference + Gaussian noise whose per-tensor RMS is `scale` times that of Delta
  (a random update of `scale` times the honest magnitude);
* `sign_flip`: reference - scale * Delta (pushes the model away from where training went);
* `scale`: reference + scale * Delta (an honest direction, blown up);
* `nan`: all NaN (a broken client; the server's screening must reject it);
* `garbage_data` is not an upload transform: the client trains honestly on random tokens
  (`garbage_tokens` replaces its training data once, at the start);
* `inflated_claim` is not one either: the client claims 10^9 examples (its FedAvg weight).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from cotune.config.names import AttackKind
from cotune.state import AdapterState

__all__ = ["attack_upload", "garbage_tokens"]


def attack_upload(
    kind: AttackKind,
    upload: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    scale: float,
    generator: torch.Generator | None = None,
) -> AdapterState:
    """The attacker's upload, from its honest `upload` and the round's `reference`."""
    out: AdapterState = {}
    for k, ref in reference.items():
        u = upload[k]
        delta = u.detach().float() - ref.detach().float()
        if kind == "noise":
            rms = float(delta.pow(2).mean().sqrt()) if delta.numel() else 0.0
            rms = rms if rms > 0 else float(ref.float().pow(2).mean().sqrt()) or 1.0
            noise = torch.randn(delta.shape, generator=generator, dtype=torch.float32).to(delta.device)
            new = ref.float() + noise * (scale * rms)
        elif kind == "sign_flip":
            new = ref.float() - scale * delta
        elif kind == "scale":
            new = ref.float() + scale * delta
        elif kind == "nan":
            new = torch.full_like(delta, float("nan"))
        elif kind == "garbage_data":
            new = u.detach().float()
        else:
            raise ValueError(
                f"unknown attack {kind!r}; expected noise, sign_flip, scale, nan or garbage_data"
            )
        out[k] = new.to(u.dtype)
    return out


def garbage_tokens(
    ids: Tensor, vocab_size: int, generator: torch.Generator | None = None, mask: Tensor | None = None
) -> Tensor:
    """`ids` with every position (or those where `mask` is true) replaced by uniform random token ids."""
    random = torch.randint(0, vocab_size, ids.shape, generator=generator, dtype=ids.dtype)
    return random if mask is None else torch.where(mask.bool(), random, ids)
