"""Every random stream of a run, and the one function its seed is derived by.

A run has one seed (`run.seed`; DP noise has its own, `privacy.seed`). Each stream takes its seed
from `stream_seed(stream, seed, *at)`, `at` the position that tells its instances apart (a client, a
round, an epoch), so that a stream never depends on what else ran: a resumed run, another transport
or another algorithm of the FedCoLLM family draws the same numbers where nothing differs yet. The
derivation of each stream is the one it had before this module existed (the adapter digests,
scripts/adapter_digests.json, stay bit-identical); docs/architecture.md, "Randomness", tables them.

Layer 0 (torch and numpy only), so the data, training and runtime layers all derive seeds here.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Final, Literal, get_args

import numpy as np
import torch

__all__ = [
    "HASHED",
    "LLM_SLOT",
    "SERVER_SLOT",
    "Stream",
    "fresh_generator",
    "numpy_rng",
    "stream_seed",
    "torch_generator",
]

Stream = Literal[
    "global",  # torch / numpy / random's global generators (LoRA initialisation, model building)
    "model",  # a tiny random model's weights (model.tiny.seed)
    "learner",  # a learner's data cursor and dropout stream; at = its slot
    "batches",  # a learner's batch order in one epoch; seed = the learner's, at = the epoch
    "partition",  # the documents' (or the task's examples') split among the clients (numpy)
    "documents",  # an owner's own documents' order (data.clients; numpy); at = the client
    "participants",  # who is drawn for a round (federation.clients_per_round); at = the round
    "attack",  # a simulated attacker's upload; at = round, client
    "garbage",  # a garbage_data attacker's random tokens; at = the client
    "flora",  # FLoRA's fresh LoRA after a merge; at = the round
    "privacy",  # DP noise (seed: privacy.seed); at = round, noise stream
]
# Streams seeded by a hash of (stream, seed, *at): independent of each other for any seed.
HASHED: Final = frozenset({"participants", "attack", "garbage", "flora", "privacy"})
# The learners' slots besides the clients' (0, 1, ...): FedCoLLM's server SLM (theta) and LLM (omega).
SERVER_SLOT: Final = 999
LLM_SLOT: Final = 998
LEARNER_STRIDE: Final = 1000  # seed * 1000 + slot: one run's learners never share a seed
EPOCH_STRIDE: Final = 100_003  # learner seed * 100_003 + epoch: a fresh batch order every epoch


def hashed(*parts: object) -> int:
    """A 63-bit seed from `parts` (their repr, SHA-256): reproducible, no arithmetic relation between
    neighbouring rounds or clients."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def stream_seed(stream: Stream, seed: int, *at: object) -> int:
    """The seed of one instance of `stream` (the one function every random stream's seed comes from)."""
    if stream in HASHED:
        return hashed(stream, seed, *at)
    if stream == "learner":
        (slot,) = at
        return seed * LEARNER_STRIDE + int(slot)  # type: ignore[call-overload]
    if stream == "batches":
        (epoch,) = at
        return seed * EPOCH_STRIDE + int(epoch)  # type: ignore[call-overload]
    if stream not in get_args(Stream):
        raise KeyError(f"unknown random stream {stream!r}")
    return (
        seed  # global, model, partition, documents: the seed itself (documents: the client goes to numpy_rng)
    )


def torch_generator(stream: Stream, seed: int, *at: object) -> torch.Generator:
    """A CPU generator of its own for one instance of `stream`: independent of torch's global one."""
    return torch.Generator().manual_seed(stream_seed(stream, seed, *at))


def numpy_rng(stream: Stream, seed: int, *at: int) -> np.random.Generator:
    """A numpy generator for one instance of `stream`: its seed and `at` are the SeedSequence's entropy
    words (`default_rng([s])` draws what `default_rng(s)` draws)."""
    return np.random.default_rng([stream_seed(stream, seed), *at])


def fresh_generator() -> torch.Generator:
    """A generator seeded by the OS, never repeated: DP noise when privacy.seed is unset (noise that a
    rerun could reproduce would be no protection against whoever can rerun it)."""
    return torch.Generator().manual_seed(secrets.randbits(63))
