"""What one round sent to and received from each client, in bytes: the `comm` records of both loops.

A loop counts a message where it builds it (an adapter sent to train, evaluate or rate peers, an upload,
prediction logits) and logs the round's counts once, against the full (small) model's size; a checkpoint
keeps the counts, so a round resumed during its evaluation logs its traffic whole. With
`federation.compress`, an adapter counts the bytes its encoding sends (`adapter_bytes`, `update_bytes`:
exact, from the tensors' shapes); otherwise its raw tensor data, as always.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from cotune.algorithms.compression import Compression, state_size
from cotune.records import CommRecord
from cotune.state import state_bytes


class Traffic:
    """Bytes to (`down`) and from (`up`) each client in the current round. With `travels` False (a
    strategy that exchanges nothing: local) every message counts 0 bytes: each client still gets its
    record, of zeros, so a report can say that nothing travels."""

    def __init__(
        self, full_model_bytes: int, travels: bool = True, compression: Compression | None = None
    ) -> None:
        self.full_model_bytes = full_model_bytes
        self.travels = travels
        self.compression = compression if compression is not None and not compression.off else None
        self.sent: Counter[int] = Counter()
        self.received: Counter[int] = Counter()

    def new_round(self) -> None:
        self.sent, self.received = Counter(), Counter()

    def down(self, sizes: Mapping[int, int]) -> None:
        """Messages to clients: bytes by client, added to the round's counts."""
        self.sent.update(self.counted(sizes))

    def up(self, sizes: Mapping[int, int]) -> None:
        """Messages from clients: bytes by client, added to the round's counts."""
        self.received.update(self.counted(sizes))

    def adapter_bytes(self, state: Mapping[str, Tensor]) -> int:
        """An adapter the server sends whole (its reply): encoded by the codec, never sparsified."""
        return state_bytes(state) if self.compression is None else state_size(state, self.compression)

    def update_bytes(self, state: Mapping[str, Tensor]) -> int:
        """A client's upload: its round update, encoded (and sparsified, with topk)."""
        if self.compression is None:
            return state_bytes(state)
        return state_size(state, self.compression, sparsify=True)

    def counted(self, sizes: Mapping[int, int]) -> dict[int, int]:
        """What a message adds to the counts: its bytes, or 0 for every client when nothing travels."""
        return dict(sizes) if self.travels else dict.fromkeys(sizes, 0)

    def records(self, round_: int) -> list[CommRecord]:
        """One record per client that sent or received anything this round, by client index."""
        return [
            CommRecord(
                round=round_,
                client=i,
                bytes_up=self.received.get(i, 0),
                bytes_down=self.sent.get(i, 0),
                full_slm_bytes=self.full_model_bytes,
            )
            for i in sorted(set(self.sent) | set(self.received))
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"sent": dict(self.sent), "received": dict(self.received)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Counts saved by `state_dict` (checkpoints of older versions have none: an empty round)."""
        self.sent, self.received = Counter(state.get("sent", {})), Counter(state.get("received", {}))
