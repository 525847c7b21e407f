"""Has a client's local training diverged? The rule both round loops apply to every upload.

Training has diverged when, after a client's local steps,
- its training loss is not finite (NaN or infinite), or its adapter holds a non-finite weight; or
- its update exploded: the round's change to what the adapter adds to some base weight,
  scale * (B A - B0 A0) from the adapter it was sent (B0, A0), has a root-mean-square above
  `UPDATE_RMS_LIMIT` (1.0). The round's change, not the adapter: under DP the adapter a client is sent
  carries the aggregation's noise, which is no divergence. The base weights of a language model are ~0.02 RMS
  and a working LoRA's update is far smaller still, so an update this large drowns the model it adapts:
  its predictions collapse towards uniform (loss near log(vocab size)), as `train.lr=10` does on the
  tiny model within one round, while the loss alone stays near where a random model starts.
A run stops (`TrainingDiverged`, exit 2) with its completed rounds kept when every client of a round
diverged (`check_round`); nothing here changes what training computes (it only reads the uploads).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from cotune.errors import OrdinaryError

UPDATE_RMS_LIMIT = 1.0
A_PART, B_PART = ".lora_A.", ".lora_B."


class TrainingDiverged(ValueError, OrdinaryError):
    """A client's training diverged: the run stops with the rounds completed so far kept."""


def update_rms(adapter: Mapping[str, Tensor], start: Mapping[str, Tensor], scale: float) -> tuple[float, str]:
    """The largest RMS over the adapted modules of the round's update, scale * (B A - B0 A0) from the
    adapter the client started from (`start`) to `adapter`, and that module's name.

    With B = [B, B0] and A = [A; -A0] stacked, ||B A||_F^2 = sum((B^T B) * (A A^T)): products of rank-size
    matrices, never the out x in one."""
    worst, where = 0.0, ""
    for a_key, a in adapter.items():
        b_key = a_key.replace(A_PART, B_PART)
        b, a0, b0 = adapter.get(b_key), start.get(a_key), start.get(b_key)
        if A_PART not in a_key or b is None or a0 is None or b0 is None:
            continue  # not a LoRA pair: the upload's screening refuses it
        try:
            bs = torch.cat([b.detach().double(), b0.detach().double()], dim=1)
            as_ = torch.cat([a.detach().double(), -a0.detach().double()], dim=0)
            square = float(((bs.T @ bs) * (as_ @ as_.T)).sum())
        except RuntimeError:  # shapes that do not pair up: the screening refuses that upload too
            continue
        rms = scale * math.sqrt(max(square, 0.0) / (b.shape[0] * a.shape[1]))
        if not rms <= worst:  # a NaN is worse than anything
            worst, where = rms, a_key.split(A_PART)[0]
    return worst, where


def divergence(
    loss: float, adapter: Mapping[str, Tensor], start: Mapping[str, Tensor], scale: float
) -> str | None:
    """What shows that a client's local training from `start` to `adapter` diverged (the rule above), in
    words; None if nothing."""
    if not math.isfinite(loss):
        return "its training loss is not finite (NaN or infinite)"
    if not all(bool(torch.isfinite(t).all()) for t in adapter.values()):
        return "its adapter holds NaN or infinite weights"
    rms, module = update_rms(adapter, start, scale)
    if not rms <= UPDATE_RMS_LIMIT:
        return (
            f"its update exploded (the round changes {module[-120:]} by an RMS of {rms:.3g}, above "
            f"{UPDATE_RMS_LIMIT}: the model collapses towards uniform predictions)"
        )
    return None


def check_round(
    round_: int,
    trained: Mapping[str, tuple[float, Mapping[str, Tensor], Mapping[str, Tensor]]],
    scale: float,
    lower: str,
) -> None:
    """Stop the run when every client that trained in `round_` diverged: `trained` maps each client's name
    to (its loss, its adapter, the adapter it started from).

    Every client, because then the cause is the run's settings (all clients share them), and going on only
    wastes the remaining rounds (`lower` names the settings to lower, with their values). One client
    that diverges alone is one bad upload among good ones, which the screening and the aggregation deal
    with (a non-finite upload is always rejected): it must not stop a federation whose other clients are
    fine."""
    found = {
        name: divergence(loss, adapter, start, scale) for name, (loss, adapter, start) in trained.items()
    }
    if not found or any(what is None for what in found.values()):
        return
    first = min(found)
    kept = "round 0" if round_ == 1 else f"rounds 0-{round_ - 1}"
    others = f" (and so did the {len(found) - 1} other client(s) of the round)" if len(found) > 1 else ""
    raise TrainingDiverged(
        f"training diverged: {first} in round {round_}: {found[first]}{others}. The run stopped; its "
        f"checkpoints of {kept} are kept. Start a new run with a lower {lower} or with train.max_grad_norm "
        "set; a resume would diverge again"
    )
