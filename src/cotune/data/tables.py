"""Tabular data in Hugging Face `datasets` form: parquet, CSV, JSON, arrow files and `save_to_disk` folders.

Read through `datasets` (the `datasets` extra), fully offline, into memory: the library's build cache
goes to a temporary folder removed right after, so no copy of an owner's data is left under
~/.cache. Columns are named by the config (`text_column` for language modelling; `task.columns` for
prompt / choices / answer / label); a missing column is an error that names the column, the file
and the columns it has — never a value.
"""

from __future__ import annotations

import tempfile
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
    return datasets


def load_table(path: Path) -> Any:
    """The rows of one table file or saved dataset, in memory (a `datasets.Dataset`)."""
    path = Path(path).expanduser()
    ds_lib = _datasets()
    if is_saved_dataset(path):
        loaded = ds_lib.load_from_disk(str(path), keep_in_memory=True)
        if isinstance(loaded, ds_lib.DatasetDict):
            if len(loaded) != 1:
                raise DataError(
                    f"{path} holds splits {sorted(loaded)}: point the path at one split's folder "
                    f"({path}/<split>)"
                )
            loaded = next(iter(loaded.values()))
        return loaded
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None or not path.is_file():
        raise DataError(f"{path} is not a parquet, CSV, JSON or arrow file, nor a save_to_disk folder")
    if kind == "arrow":
        return ds_lib.Dataset.from_file(str(path), in_memory=True)
    with tempfile.TemporaryDirectory(prefix="cotune-table-") as cache:
        reader = {"parquet": ds_lib.Dataset.from_parquet, "csv": ds_lib.Dataset.from_csv}.get(
            kind, ds_lib.Dataset.from_json
        )
        try:
            return reader(str(path), cache_dir=cache, keep_in_memory=True)
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: cannot be read as {kind} ({type(exc).__name__})") from None


def require_columns(table: Any, columns: list[str], path: Path, what: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(
            f"{path}: no column {missing[0]!r} for the {what} (it has: {', '.join(table.column_names)}); "
            "name the right one in the config"
        )
