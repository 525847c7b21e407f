"""Tabular data in Hugging Face `datasets` form: parquet, CSV, JSON, arrow files and `save_to_disk` folders.

Read through `datasets` (the `datasets` extra), fully offline, into memory: the library's build cache
goes to a temporary folder removed right after, so no copy of an owner's data is left under
~/.cache. That folder lies in a cotune-owned folder of the system temp dir, named by the reading
process's pid: a process killed while reading (SIGKILL runs no cleanup) leaves it, and the next
table read removes every folder whose process is gone (`clean_stale_builds`).
Columns are named by the config (`text_column` for language modelling; `task.columns` for
prompt / choices / answer / label); a missing column is an error that names the column, the file
and the columns it has — never a value.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cotune.data.errors import DataError

TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".arrow": "arrow"}
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and any((path / m).is_file() for m in SAVED_MARKERS)


def is_table(path: Path) -> bool:
    return (path.is_file() and path.suffix.lower() in TABLE_SUFFIXES) or is_saved_dataset(path)


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading parquet / CSV / JSON / arrow files or a save_to_disk folder needs Hugging Face "
            "datasets: pip install 'cotune[datasets]' (make setup installs it)"
        ) from None
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)  # its read errors quote the parser's message
    return datasets


def builds_root() -> Path:
    """This user's folder for table builds in the system temp dir (private: mode 0700)."""
    root = Path(tempfile.gettempdir()) / f"cotune-tables-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    st = root.lstat()
    if not root.is_dir() or root.is_symlink() or st.st_uid != os.getuid():
        raise DataError(f"{root} is not a folder of this user: remove it (cotune keeps table builds there)")
    return root


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def clean_stale_builds(root: Path) -> None:
    """Remove the build folders (`<pid>-<random>`) of processes that are gone: a killed read's copy."""
    for d in root.iterdir():
        pid = d.name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def build_folder() -> Iterator[str]:
    """A temporary folder for one table build, removed after it (and by the next read if killed)."""
    root = builds_root()
    clean_stale_builds(root)
    with tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-", dir=root) as cache:
        yield cache


def load_table(path: Path, text: Sequence[str] = ()) -> Any:
    """The rows of one table file or saved dataset, in memory (a `datasets.Dataset`); a file that does
    not parse is an error naming the file and the format, never its content.

    A CSV cell has no type: pandas would read a column of "42", "3.14", "007" as numbers (and "NA",
    "None", "null" as missing). The columns named in `text` are read as the text they hold, every cell as
    written but an empty one, which is missing; the other columns as pandas infers them. Typed formats
    (parquet, JSON, arrow) keep their own types."""
    path = Path(path).expanduser()
    ds_lib = _datasets()
    kind = "save_to_disk folder" if is_saved_dataset(path) else TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None or not (path.is_file() or is_saved_dataset(path)):
        raise DataError(f"{path} is not a parquet, CSV, JSON or arrow file, nor a save_to_disk folder")
    try:
        return read_table(ds_lib, path, kind, csv_text_options(text))
    except (ValueError, OSError, ds_lib.exceptions.DatasetsError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(
            f"{path}: cannot be read as {kind} ({type(exc).__name__}); check that it is a valid {kind} file"
        ) from None


def csv_text_options(text: Sequence[str]) -> dict[str, Any]:
    """pandas' CSV options that read the `text` columns as written, an empty cell as missing
    (`load_table`); none for no column."""
    if not text:
        return {}
    return {
        "converters": dict.fromkeys(text, str),
        "keep_default_na": False,
        "na_values": {column: [""] for column in text},
    }


def read_table(ds_lib: Any, path: Path, kind: str, csv_options: dict[str, Any] | None = None) -> Any:
    if kind == "save_to_disk folder":
        loaded = ds_lib.load_from_disk(str(path), keep_in_memory=True)
        if isinstance(loaded, ds_lib.DatasetDict):
            if len(loaded) != 1:
                raise DataError(
                    f"{path} holds splits {sorted(loaded)}: point the path at one split's folder "
                    f"({path}/<split>)"
                )
            loaded = next(iter(loaded.values()))
        return loaded
    if kind == "arrow":
        return ds_lib.Dataset.from_file(str(path), in_memory=True)
    with build_folder() as cache:
        if kind == "csv":
            return ds_lib.Dataset.from_csv(
                str(path), cache_dir=cache, keep_in_memory=True, **(csv_options or {})
            )
        reader = ds_lib.Dataset.from_parquet if kind == "parquet" else ds_lib.Dataset.from_json
        return reader(str(path), cache_dir=cache, keep_in_memory=True)


def require_columns(table: Any, columns: list[str], path: Path, what: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(
            f"{path}: no column {missing[0]!r} for the {what} (it has: {', '.join(table.column_names)}); "
            "name the right one in the config"
        )
