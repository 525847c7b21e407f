"""A private random stream per trained adapter, for what draws from torch's global generator.

LoRA dropout (peft's `nn.Dropout`) takes its masks from torch's global generator, which nothing
passes a generator to. Shared, it would tie every client's masks to everything that ran before it
in the process: the server building its LLM adapter, the server's distillation steps, the other
simulated clients. Then two algorithms of the FedCoLLM family would draw different masks for the
same client although nothing differs yet, and a client's masks would depend on the transport.

`RandomStream` keeps its own generator state and swaps it into the global generator only while
its adapter trains (`with stream.active(): ...`); the global state is restored afterwards, so
nothing outside sees it move. Its state is part of the trainer state (checkpoint, resume).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class RandomStream:
    """torch's global CPU (and, on CUDA, that device's) random state, owned by one learner."""

    def __init__(self, seed: int, device: torch.device | str) -> None:
        device = torch.device(device)
        self.cuda = device if device.type == "cuda" else None
        with torch.random.fork_rng(devices=self._devices()):
            torch.manual_seed(seed)
            self.cpu_state = torch.get_rng_state()
            self.cuda_state = torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None

    def _devices(self) -> list[torch.device]:
        return [self.cuda] if self.cuda is not None else []

    @contextmanager
    def active(self) -> Iterator[None]:
        """Draws inside the block come from this stream; the global state is as it was afterwards."""
        with torch.random.fork_rng(devices=self._devices()):
            torch.set_rng_state(self.cpu_state)
            if self.cuda is not None and self.cuda_state is not None:
                torch.cuda.set_rng_state(self.cuda_state, self.cuda)
            try:
                yield
            finally:
                self.cpu_state = torch.get_rng_state()
                if self.cuda is not None:
                    self.cuda_state = torch.cuda.get_rng_state(self.cuda)

    def state_dict(self) -> dict[str, Any]:
        cuda = None if self.cuda_state is None else self.cuda_state.clone()
        return {"cpu": self.cpu_state.clone(), "cuda": cuda}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cpu_state = state["cpu"].clone()
        if state.get("cuda") is not None and self.cuda is not None:
            self.cuda_state = state["cuda"].clone()
