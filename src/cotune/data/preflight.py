"""Every data path a config names, checked before any model loads, every problem reported at once.

A missing owner folder or a bad JSONL line would otherwise surface after the model has loaded, one
client per run. The checks are cheap: each path's status (exists, a regular file or folder, readable;
special files refused unopened), the kinds of files in a folder, a table's columns where its header
is cheap to read (CSV, parquet), and every line of a .jsonl file up to `PARSE_LIMIT` bytes. Each
problem is one line naming the config key and the file (and the line of a JSONL row), never content.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from pathlib import Path

from cotune.config.schema import ExperimentConfig, GenerationSettings, SourceConfig, TaskConfig
from cotune.data.corpora import jsonl_document, read_user_text
from cotune.data.errors import DataError
from cotune.data.files import MAX_TEXT_BYTES, no_files_message, path_problem, scan_folder
from cotune.data.generation import gen_line, layout_columns, row_layout
from cotune.data.tables import is_saved_dataset, is_table
from cotune.data.tasks import task_line

PARSE_LIMIT = 64 << 20  # a larger .jsonl file is parsed when it is loaded, not twice
MAX_LINES = 40  # problems listed in one error; the rest are counted
PER_FILE = 5  # JSONL row problems listed per file


def check_data(cfg: ExperimentConfig) -> None:
    """Raise one `DataError` listing every problem of the config's data paths (none: return)."""
    problems = data_problems(cfg)
    if problems:
        shown = problems[:MAX_LINES]
        if len(problems) > MAX_LINES:
            shown.append(f"... and {len(problems) - MAX_LINES} more")
        raise DataError(
            f"{len(problems)} data problem(s), found before loading the model:\n"
            + "\n".join(f"  - {p}" for p in shown)
        )


def data_problems(cfg: ExperimentConfig) -> list[str]:
    """Every problem of the data paths the config's family reads, one line each, in config order."""
    out: list[str] = []
    if cfg.is_cotuning:
        task = cfg.task
        if task is None:
            return out
        if task.source is not None and task.source.corpus == "files":
            out += text_problems("task.source.path", task.source, "task.source.text_column")
        named = [("task.path", task.path), ("task.public", task.public), ("task.test", task.test)]
        named += [(f"task.clients[{i}]", p) for i, p in enumerate(task.clients or [])]
        for key, path in named:
            if path is not None:
                out += task_problems(key, Path(path), task)
        return out
    data = cfg.data
    if data.kind == "generation":  # generation files (data.sources are shipped tasks: nothing to read)
        named = [("data.path", data.path), ("data.public", data.public)]
        named += [(f"data.clients[{i}]", p) for i, p in enumerate(data.clients or [])]
        for key, path in named:
            if path is not None:
                out += example_file_problems(key, Path(path), data, True, "data.columns")
        return out
    if data.clients is not None:
        sources = [(f"data.clients[{i}]", p) for i, p in enumerate(data.clients)]
        sources += [("data.public", data.public)] if data.public is not None else []
        for key, path in sources:
            source = SourceConfig(corpus="files", path=path, text_column=data.text_column)
            out += text_problems(key, source, "data.text_column")
        return out
    keyed = (
        [("data.path", s) for s in data.resolved_sources()]
        if data.path is not None
        else [(f"data.sources[{i}].path", s) for i, s in enumerate(data.sources)]
    )
    for key, src in keyed:
        if src.corpus == "files":
            setting = (
                "data.sources[].text_column" if key == "data.path" else key[: -len("path")] + "text_column"
            )
            out += text_problems(key, src, setting)
    return out


def text_problems(key: str, src: SourceConfig, setting: str) -> list[str]:
    """Problems of a files source (language-model text): its path, folder, tables' and JSONL's text."""
    assert src.path is not None
    root = src.path.expanduser()
    files, problems = path_files(root)
    out = [f"{key}: {p}" for p in problems]
    for f in files:
        out += [f"{key}: {p}" for p in file_problems(f, src, setting)]
    return out


def path_files(root: Path) -> tuple[list[Path], list[str]]:
    """The data files of a path (a saved dataset is one) and the problems found walking it."""
    problem = path_problem(root)
    if problem is not None:
        return [], [problem]
    if not root.is_dir() or is_saved_dataset(root):
        return [root], []
    scan = scan_folder(root)
    if not scan.files and not scan.problems:
        return [], [no_files_message(root, scan.skipped)]
    return scan.files, scan.problems


def file_problems(f: Path, src: SourceConfig, setting: str) -> Iterator[str]:
    """Problems of one file of a files source; `setting`: the config key that names its text column."""
    if is_table(f):
        yield from table_problems(f, [src.text_column], setting)
    elif f.suffix.lower() == ".jsonl":
        yield from jsonl_problems(f, lambda line, where: jsonl_document(line, where, src.text_column))
    elif f.stat().st_size > MAX_TEXT_BYTES:
        yield f"{f}: over the {MAX_TEXT_BYTES >> 20} MiB limit for one text file; split it into several files"
    elif f.stat().st_size <= PARSE_LIMIT:  # binary or not UTF-8: found now, not after the model loads
        try:
            read_user_text(f)
        except DataError as exc:
            yield str(exc)


def task_problems(key: str, path: Path, task: TaskConfig) -> list[str]:
    """Problems of one task file (a multiple-choice or a generation task's)."""
    return example_file_problems(key, path, task, task.kind == "generation", "task.columns")


def example_file_problems(
    key: str, path: Path, settings: GenerationSettings, generation: bool, setting: str
) -> list[str]:
    """Problems of one file of examples (a task's, or a client's generation data): its status, its kind
    (JSONL or a table), its columns or lines; generation examples are read in their layout
    (`settings.layout`, or found from the columns). `setting`: the key that renames the columns."""
    problem = path_problem(path.expanduser())
    if problem is not None:
        return [f"{key}: {problem}"]
    path = path.expanduser()
    columns = settings.columns
    if is_table(path):
        wanted = example_columns(path, settings, generation)
        return [f"{key}: {p}" for p in table_problems(path, wanted, setting)]
    if path.is_dir():
        what = "task file" if key.startswith("task") else "generation file"
        return [f"{key}: {path}: a folder, not a {what} (.jsonl, a table or a save_to_disk folder)"]

    def parse(line: str, where: str) -> object:
        if generation:
            return gen_line(line, where, columns, settings.layout)
        return task_line(line, where, columns)

    return [f"{key}: {p}" for p in jsonl_problems(path, parse, True)]


def example_columns(path: Path, settings: GenerationSettings, generation: bool) -> list[str]:
    """The columns a table of examples needs: the multiple-choice fields, or those of its generation
    layout (found from the header where that is cheap to read)."""
    columns = settings.columns
    if not generation:
        return [columns.prompt, columns.choices, columns.answer]
    if settings.layout != "auto":
        return layout_columns(settings.layout, columns)
    try:
        names = table_columns(path)
    except DataError:
        names = None  # table_problems reports it
    return layout_columns(row_layout(names or [], columns), columns)


def jsonl_problems(f: Path, parse: Callable[[str, str], object], need_rows: bool = False) -> Iterator[str]:
    """Each bad line of a .jsonl file (`parse(line, "file:line")` raises DataError), at most PER_FILE."""
    if f.stat().st_size > PARSE_LIMIT:
        return
    try:
        text = read_user_text(f)
    except DataError as exc:
        yield str(exc)
        return
    bad, rows = 0, 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rows += 1
        try:
            parse(line, f"{f}:{n}")
        except DataError as exc:
            bad += 1
            if bad <= PER_FILE:
                yield str(exc)
    if bad > PER_FILE:
        yield f"{f}: {bad - PER_FILE} more bad lines"
    if need_rows and rows == 0:
        yield f"{f}: no rows (the file is empty)"


def table_problems(f: Path, wanted: list[str], setting: str) -> Iterator[str]:
    """Columns of a table missing from its header, where the header is cheap to read (CSV, parquet)."""
    try:
        names = table_columns(f)
    except DataError as exc:
        yield str(exc)
        return
    if names is None:
        return
    missing = [c for c in wanted if c not in names]
    if missing:
        yield (
            f"{f}: no column {', '.join(map(repr, missing))} (it has: {', '.join(names)[:300]}); "
            f"name the right one with {setting}"
        )


def table_columns(f: Path) -> list[str] | None:
    """A CSV's header row or a parquet file's schema names; None where that is not cheap to know."""
    suffix = f.suffix.lower()
    if suffix == ".csv" and f.is_file():
        with f.open("rb") as raw:
            head = raw.read(1 << 20).decode("utf-8", errors="replace")
        return next(csv.reader(io.StringIO(head)), [])
    if suffix == ".parquet" and f.is_file():
        try:
            import pyarrow.parquet as pq
        except ImportError:
            return None
        try:
            return list(pq.read_schema(f).names)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{f}: cannot be read as parquet ({type(exc).__name__})") from None
    return None
