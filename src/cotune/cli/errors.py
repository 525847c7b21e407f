"""How the `cotune` command ends when something goes wrong.

cotune exists for data that must not leave its owner, so a failure never prints a traceback with
local variables (which can hold lines of training text), and never the text itself: an ordinary
condition (bad input, file system, encoding, memory, device; cotune's own `OrdinaryError`s) ends in one
`error:` paragraph that names the problem and what to do, exit code 2; anything else is a bug, reported
by its type and where it happened in cotune (no message: it could quote data), exit code 1. `--debug` adds the
traceback, still without local variables.
"""

from __future__ import annotations

import errno
import os
import traceback
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from cotune.errors import OrdinaryError
from cotune.layout import CHECKPOINTS_DIR
from cotune.reporting.text import printable_lines

ORDINARY_EXIT = 2
BUG_EXIT = 1
INTERRUPTED_EXIT = 130


def validation_text(exc: ValidationError) -> str:
    """A pydantic error without the offending values (they may be user data)."""
    parts = []
    for e in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(x) for x in e["loc"]) or "(top level)"
        parts.append(f"{where}: {e['msg']}")
    return f"invalid {exc.title}: " + "; ".join(parts)


def print_error(console: Console, message: str) -> None:
    """`error: MESSAGE`, the message printed as it is: `[trackers]` or `[q_proj]` are text, not markup, and
    a control character in a path it names is shown escaped, never sent to the terminal."""
    console.print(Text.assemble(("error:", "bold red"), " ", printable_lines(message)), highlight=False)


def is_read_problem(filename: str | os.PathLike[str] | None) -> bool:
    """Whether a permission problem on `filename` is one of reading it (it exists and cannot be read)."""
    if not filename:
        return False
    path = Path(filename)
    return path.exists() and not os.access(path, os.R_OK)


def os_error_text(exc: OSError) -> str:
    if exc.errno is None:  # raised by cotune with its own message
        return str(exc)
    name = f" {exc.filename}" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return (
            f"no space left on the device{' writing' + name if name else ''}: free some space; every "
            "completed round is kept, continue with `cotune run --resume RUN_DIR`"
        )
    if not exc.filename:  # the file is not known here; the traceback says where it was
        return (
            f"{exc.strerror or type(exc).__name__} (errno {exc.errno}) on a file cotune was reading or "
            "writing; rerun with --debug to see where"
        )
    if isinstance(exc, PermissionError) and is_read_problem(exc.filename):
        return f"permission denied reading{name}: make it readable for your user, or use another file"
    if isinstance(exc, PermissionError):
        return f"permission denied:{name}; choose a location you can write (e.g. --out DIR)"
    if isinstance(exc, IsADirectoryError | NotADirectoryError | FileExistsError | FileNotFoundError):
        return f"{exc.strerror or type(exc).__name__}:{name}"
    if exc.errno == errno.EFBIG:
        return f"file too large:{name}: it reached the file size limit (ulimit -f) or the file system's"
    if exc.strerror:
        return f"{exc.strerror}:{name}"
    return str(exc)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def ordinary_text(exc: BaseException) -> str | None:
    """The error paragraph for an ordinary condition, or None when the exception is a bug."""
    if isinstance(exc, ValidationError):
        return validation_text(exc)
    if isinstance(exc, OrdinaryError):  # cotune's own: its message says what to do
        return str(exc)
    if is_out_of_memory(exc):
        return (
            "out of memory: lower train.batch_size or train.eval_batch_size (or data.seq_len / "
            "task.max_length), or use a smaller model"
        )
    if isinstance(exc, UnicodeDecodeError):  # the raising site names the file where it can (ValueError)
        return (
            f"a file is not valid {exc.encoding} text (undecodable byte at offset {exc.start}): save it as "
            "UTF-8 text"
        )
    if isinstance(exc, OSError):
        return os_error_text(exc)
    if isinstance(exc, ValueError):  # cotune's own checks, torch's and the optimizer's refusals
        return str(exc)
    return None


def where_in_cotune(exc: BaseException) -> str:
    """file:line of the innermost frame inside cotune (no code, no values)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "cotune" in Path(f.filename).parts]
    if not frames:
        return "outside cotune"
    f = frames[-1]
    parts = Path(f.filename).parts
    return f"{'/'.join(parts[parts.index('cotune') :])}:{f.lineno} ({f.name})"


def report_failure(exc: BaseException, console: Console, debug: bool) -> int:
    """Print one paragraph for `exc` and return the exit code."""
    if debug:
        console.print("".join(traceback.format_exception(exc)), markup=False, highlight=False)
    text = ordinary_text(exc)
    if text is not None:
        print_error(console, text)
        return ORDINARY_EXIT
    hint = "" if debug else "; rerun with --debug to see the traceback"
    print_error(
        console,
        f"internal error {type(exc).__name__} at {where_in_cotune(exc)}. This is a bug "
        f"in cotune, please report it{hint} (it shows no local variables, but may quote messages).",
    )
    return BUG_EXIT


def report_interrupt(console: Console, run_dir: Path | None, running: bool) -> int:
    """Ctrl-C: one line; for a run (`running`), what of it is kept and how to go on."""
    if not running:
        console.print("interrupted", highlight=False)
    elif run_dir is not None and (run_dir / CHECKPOINTS_DIR).is_dir():
        console.print(
            f"interrupted: every completed round is kept; continue with `cotune run --resume {run_dir}`",
            highlight=False,
            markup=False,  # a run directory may be named with brackets
        )
    else:
        console.print("interrupted before any round was completed: nothing to resume", highlight=False)
    return INTERRUPTED_EXIT
