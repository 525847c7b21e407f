"""The user's data files on disk: which files a data folder holds, read safely, and owners' names.

Only regular files are read. A FIFO, socket or device (or a symbolic link to one, e.g. to /dev/zero)
is named and refused without being opened: opening a FIFO blocks forever and a device never ends.
A symbolic link to a regular file or a folder is followed (wherever it points); a folder reached
twice (a link loop) is walked once. Every problem of a folder is collected, so a caller can report
them all at once. Messages name paths, never file contents (they may be private).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cotune.data.errors import DataError
from cotune.data.tables import TABLE_SUFFIXES

# plain-text files read as one document each: prose, markup and source code (what an owner's notes or
# code folder holds); any other suffix in a folder is skipped (a file named on its own is read as text)
TEXT_SUFFIXES = (
    ".txt", ".text", ".md", ".rst", ".tex",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts", ".go", ".rs", ".rb",
    ".sh", ".sql",
)  # fmt: skip
DATA_SUFFIXES = frozenset((*TEXT_SUFFIXES, ".jsonl", *TABLE_SUFFIXES))
# a text file larger than this is refused (its text and tokens are held in memory: several times its size)
MAX_TEXT_BYTES = 1 << 30


def owner_name(path: Path | str) -> str:
    """A data owner's name, the ONE place it is derived: its folder's name, or its file's without the
    extension. Raw: it comes from the file system, so whoever prints it must sanitise it first."""
    return Path(path).expanduser().stem


def special_kind(mode: int) -> str | None:
    """What a non-regular, non-folder file is, in words (None for a regular file or a folder)."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def path_problem(path: Path) -> str | None:
    """Why `path` cannot be read as data (missing, a broken or looping link, a special file), else None;
    decided from its status alone, never by opening it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"{path}: " + ("a broken symbolic link" if path.is_symlink() else "does not exist")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path}: a symbolic link loop"
        return f"{path}: cannot be read ({exc.strerror})"
    kind = special_kind(mode)
    if kind is not None:
        return (
            f"{path}: {kind}, not a regular file: only regular files are read; remove it or point elsewhere"
        )
    if not os.access(path, os.R_OK | (os.X_OK if stat.S_ISDIR(mode) else 0)):
        return f"{path}: permission denied; make it readable"
    return None


@dataclass
class FolderScan:
    """A data folder's readable files (sorted), the problems found and the suffixes skipped."""

    files: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: set[str] = field(default_factory=set)

    def raise_problems(self, root: Path) -> None:
        """One error naming every problem, or, with no readable file, the suffixes that were found."""
        if self.problems:
            raise DataError("\n".join(self.problems))
        if not self.files:
            raise DataError(no_files_message(root, self.skipped))


def no_files_message(root: Path, skipped: set[str]) -> str:
    found = f"only {', '.join(sorted(skipped)[:12])} files" if skipped else "no files"
    return (
        f"{root}: no data files ({found}); a folder is read for text files "
        f"({' '.join(TEXT_SUFFIXES)}), .jsonl lines and tables ({' '.join(sorted(TABLE_SUFFIXES))})"
    )


def scan_folder(root: Path) -> FolderScan:
    """Every data file under `root`, following links, each folder once (so a link loop ends)."""
    scan = FolderScan()
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            scan.problems.append(f"{folder}: cannot be listed ({exc.strerror})")
            continue
        for entry in entries:
            path = Path(entry.path)
            problem = path_problem(path)
            if problem is not None:
                scan.problems.append(problem)
            elif path.is_dir():
                stack.append(path)
            elif path.suffix.lower() in DATA_SUFFIXES:
                scan.files.append(path)
            else:
                scan.skipped.add(path.suffix.lower() or "(no suffix)")
    scan.files.sort()
    return scan


def data_files(root: Path) -> list[Path]:
    """The files of a data path: the file itself, or a folder's data files; refused (every problem at
    once) when it holds a special file or nothing readable."""
    problem = path_problem(root)
    if problem is not None:
        raise DataError(problem)
    if not root.is_dir():
        return [root]
    scan = scan_folder(root)
    scan.raise_problems(root)
    return scan.files


def read_regular_bytes(path: Path, limit: int | None = None) -> bytes:
    """A regular file's bytes. Opened non-blocking and checked on the open descriptor, so a FIFO or
    device swapped in after a scan is refused, never read; a file over `limit` bytes is refused."""
    limit = MAX_TEXT_BYTES if limit is None else limit
    problem = path_problem(path)
    if problem is not None:
        raise DataError(problem)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        kind = special_kind(st.st_mode)
        if kind is not None or stat.S_ISDIR(st.st_mode):
            raise DataError(f"{path}: {kind or 'a folder'}, not a regular file: only regular files are read")
        if st.st_size > limit:
            raise DataError(
                f"{path}: {st.st_size / 2**20:.0f} MiB is over the {limit / 2**20:.0f} MiB limit for one "
                "text file; split it into several files"
            )
        return f.read()
