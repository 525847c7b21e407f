"""A SuperNode's trainer state on its own disk, between messages and across crashes.

Flower runs each message in a fresh ClientApp process. After every round it trains, a node writes
its adapter, optimizer, schedule, data cursor and RNG here, under `state-dir` (node config; default
`$XDG_STATE_HOME/cotune/nodes`, i.e. `~/.local/state/cotune/nodes`), and its next message starts
from there. Unlike Flower's `Context.state` (in the SuperNode's memory, one Flower run's), this
survives a SuperNode that died and belongs to the cotune run (its run key), not to one Flower run:
a resumed run is a new Flower run.

Why on the node and not in the server's checkpoint: the optimizer moments are statistics of the
node's private gradients, more revealing than the adapter it uploads, and under SecAgg+ the server
must not even see single adapters. So this state never leaves the node's machine. The server's
checkpoint records, per client, the last round that client trained (`FlowerClients.state_dict`);
on `cotune run --resume` every node reloads exactly that round's file. The last two rounds are
kept: a node may be one round ahead of the server's last complete checkpoint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from cotune.reporting.files import replace_atomically
from cotune.state import AdapterState

STATE_ENV = "COTUNE_NODE_STATE"
KEEP = 2  # rounds kept per client: the server's last checkpoint and the round after it
ROUND_FILE = re.compile(r"^round-(\d+)\.pt$")


def default_state_dir() -> Path:
    """$COTUNE_NODE_STATE (set for a simulation's virtual nodes), else $XDG_STATE_HOME/cotune/nodes."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cotune" / "nodes"


class NodeStateStore:
    """One client's saved trainer states in one run (`<state-dir>/<run key>/client-<i>/round-N.pt`)."""

    def __init__(self, root: Path, run_key: str, client: int) -> None:
        if not re.fullmatch(r"[0-9a-f]{8,64}", run_key):
            raise ValueError(f"malformed run key {run_key!r} in the server's message")
        self.dir = Path(root).expanduser() / run_key / f"client-{client}"

    def path(self, round_: int) -> Path:
        return self.dir / f"round-{round_:05d}.pt"

    def rounds(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := ROUND_FILE.match(p.name)))

    def latest(self) -> int | None:
        found = self.rounds()
        return found[-1] if found else None

    def save(self, round_: int, adapter: AdapterState, trainer: dict[str, Any]) -> None:
        """Write atomically (a killed node leaves the previous rounds intact), then drop older rounds."""
        self.write(self.path(round_), {"round": round_, "adapter": adapter, "trainer": trainer})
        for old in self.rounds()[:-KEEP]:
            self.path(old).unlink(missing_ok=True)

    def write(self, path: Path, content: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, lambda tmp: torch.save(content, tmp))

    @property
    def base_path(self) -> Path:
        return self.dir / "merged-base.pt"

    def save_base(self, update: AdapterState) -> None:
        """FLoRA: the update merged into this node's base so far (stacked), for its next messages."""
        self.write(self.base_path, {"update": update})

    def load_base(self) -> AdapterState | None:
        if not self.base_path.is_file():
            return None
        return torch.load(self.base_path, map_location="cpu", weights_only=True)["update"]

    def load(self, round_: int) -> tuple[AdapterState, dict[str, Any]]:
        path = self.path(round_)
        if not path.is_file():
            have = ", ".join(map(str, self.rounds())) or "none"
            raise FileNotFoundError(
                f"this SuperNode has no saved state for round {round_} of the run being resumed (rounds "
                f"saved: {have}); was it started with another state-dir, or did it lose its disk? "
                f"Looked in {self.dir}"
            )
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["adapter"], saved["trainer"]
