"""One process per run directory.

Two processes writing one run directory would interleave their metrics and delete each other's
temporary checkpoints. Whoever writes a run directory (`cotune run`, `cotune run --resume`, or the
ServerApp of a Flower run) holds an exclusive `flock` on `<run_dir>/.lock` for the whole run; the
kernel releases it when the process ends, however it ends, so a killed run never leaves the
directory locked. The file names its holder for the refusal message.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cotune.errors import OrdinaryError
from cotune.layout import LOCK_FILE


class RunDirBusy(RuntimeError, OrdinaryError):
    """Another live process holds the run directory."""


def holder_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text or "a process that has not said who it is yet"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for this process; refuse (RunDirBusy) when another process holds it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir} is a file, not a run directory: choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirBusy(
            f"run directory {run_dir} is in use by another cotune process ({holder_text(path)}); wait "
            "for it to end, or stop it, then try again"
        ) from None
    try:
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode())
        yield
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (what a stale temporary file needs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
