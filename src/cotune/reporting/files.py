"""Files replaced atomically: a reader, or a process killed mid-write, sees the old file or the new one.

report.md and the plots are rewritten in place by every `cotune run` and `cotune report`; written
directly, a kill (or a full disk) leaves a truncated file behind. `replace_atomically` writes to a
temporary file in the same directory (so the rename cannot cross file systems), fsyncs it and
`os.replace`s it over the target; a failed write removes the temporary file and leaves the target alone.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DIR_MODE", "FILE_MODE", "normal_modes", "replace_atomically", "write_text_atomically"]

FILE_MODE, DIR_MODE = 0o644, 0o755  # what a file or folder cotune writes gets, under the umask


def replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` fills a temporary file next to `path`, which then replaces `path` in one rename."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE & ~umask())  # mkstemp makes 0600; the report gets a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    """`path.write_text(text, encoding="utf-8")`, atomically."""
    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def umask() -> int:
    """The process's umask (reading it means setting it: it is put back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_modes(root: Path) -> None:
    """Give `root` and everything under it a normal file's or folder's mode under the umask: safetensors
    and transformers write weights through private (0600) files, which another user of a shared
    checkpoint or export could not read."""
    mask = umask()
    for path in [root, *Path(root).rglob("*")]:
        if not path.is_symlink():
            path.chmod((DIR_MODE if path.is_dir() else FILE_MODE) & ~mask)
