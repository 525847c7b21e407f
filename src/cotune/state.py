"""The exchange unit of every method: an adapter's weights as a state dict (peft's saved-adapter keys).

Defined once here, at the bottom of the package, so algorithms, models, training and transports
all speak of the same thing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

AdapterState = dict[str, torch.Tensor]


def copied(state: Mapping[str, torch.Tensor]) -> AdapterState:
    """A copy that owns its tensors (an in-process upload is the client's slot itself)."""
    return {k: v.clone() for k, v in state.items()}


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes on the wire for a state dict (raw tensor data)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A fingerprint of an adapter's weights (bit-exact: two states match only if every key, shape and
    value does), the key of scores kept so that an adapter already scored is not scored again."""
    h = hashlib.sha256()
    for key, tensor in sorted(state.items()):
        h.update(key.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.float().cpu().numpy().tobytes())
    return h.hexdigest()
