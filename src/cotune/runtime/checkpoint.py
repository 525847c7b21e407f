"""Per-round checkpoints, written atomically so a killed run is always resumable.

A round's checkpoint is built in a temporary directory and renamed into place; a
directory named `round-NNNN` is therefore complete by construction.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from cotune.layout import CHECKPOINTS_DIR
from cotune.reporting.files import normal_modes
from cotune.runtime.lock import pid_alive

ROUND_DIR = re.compile(r"^round-(\d{4,})$")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS_DIR


def round_dir_name(round_: int) -> str:
    return f"round-{round_:04d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := ROUND_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def write_checkpoint(run_dir: Path, round_: int, write_contents, keep_last: int | None = None) -> Path:
    """`write_contents(tmp_dir)` fills a temp dir that is then renamed to round-NNNN atomically."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / round_dir_name(round_)
    for stale in root.glob(f".tmp-{round_dir_name(round_)}-*"):  # left by a killed process
        writer = stale.name.rsplit("-", 1)[-1]
        if not writer.isdigit() or not pid_alive(int(writer)) or int(writer) == os.getpid():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{round_dir_name(round_)}-{os.getpid()}"
    tmp.mkdir()
    write_contents(tmp)
    normal_modes(tmp)  # safetensors writes 0600 weight files
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last is not None:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(path: Path, state: dict[str, Any]) -> None:
    torch.save(state, path)


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.pt: tensors and plain containers only (never code from a tampered file)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
