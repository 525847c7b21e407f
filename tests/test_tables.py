"""Hugging Face `datasets` input files: parquet, CSV, JSON, arrow and save_to_disk folders, offline."""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")

from cotune.config.schema import DataConfig, SourceConfig, TaskColumns  # noqa: E402
from cotune.data.corpora import DataError, load_source  # noqa: E402
from cotune.data.tasks import load_task_file  # noqa: E402
from cotune.data.windows import build_owned_data  # noqa: E402
from cotune.models.tiny import byte_tokenizer  # noqa: E402

ROWS = {"body": [f"document {i} " + "word " * 40 for i in range(6)], "topic": ["a", "b"] * 3}


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """datasets' own cache: reading a table must leave no copy of the data there."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _write_all(tmp_path):
    ds = datasets.Dataset.from_dict(ROWS)
    paths = {
        "parquet": tmp_path / "docs.parquet",
        "csv": tmp_path / "docs.csv",
        "json": tmp_path / "docs.json",
        "saved": tmp_path / "saved",
    }
    ds.to_parquet(str(paths["parquet"]))
    ds.to_csv(str(paths["csv"]), index=False)
    ds.to_json(str(paths["json"]))
    ds.save_to_disk(str(paths["saved"]))
    return paths


def test_documents_from_every_table_format_with_named_columns(tmp_path, hf_cache):
    for kind, path in _write_all(tmp_path).items():
        docs = load_source(SourceConfig(corpus="files", path=path, text_column="body", label_column="topic"))
        assert [d.text for d in sorted(docs, key=lambda d: d.text)] == sorted(ROWS["body"]), kind
        assert sorted({d.label for d in docs}) == ["a", "b"], kind
    assert not hf_cache.exists() or not any(hf_cache.rglob("*.arrow"))  # nothing of the data was cached


def test_a_missing_column_names_the_column_the_file_and_what_it_has(tmp_path, hf_cache):
    path = _write_all(tmp_path)["parquet"]
    with pytest.raises(DataError) as err:
        load_source(SourceConfig(corpus="files", path=path))  # text_column defaults to "text"
    message = str(err.value)
    assert "'text'" in message and str(path) in message and "body, topic" in message
    assert "document 0" not in message  # never a value


def test_a_task_from_parquet_and_csv_with_renamed_columns(tmp_path, hf_cache):
    rows = {
        "question": ["Is the sky blue?", "Is fire cold?"],
        "options": [[" yes", " no"], [" yes", " no"]],
        "gold": [0, 1],
    }
    ds = datasets.Dataset.from_dict(rows)
    ds.to_parquet(str(tmp_path / "task.parquet"))
    csv = datasets.Dataset.from_dict({**rows, "options": [json.dumps(o) for o in rows["options"]]})
    csv.to_csv(str(tmp_path / "task.csv"), index=False)
    columns = TaskColumns(prompt="question", choices="options", answer="gold")
    for name in ("task.parquet", "task.csv"):
        examples = load_task_file(tmp_path / name, columns)
        assert [(e.prompt, e.choices, e.answer) for e in examples] == [
            ("Is the sky blue?", (" yes", " no"), 0),
            ("Is fire cold?", (" yes", " no"), 1),
        ], name
    with pytest.raises(DataError, match="no column 'prompt'"):
        load_task_file(tmp_path / "task.parquet")


def test_a_saved_dataset_with_several_splits_asks_for_one(tmp_path, hf_cache):
    both = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(ROWS), "test": datasets.Dataset.from_dict(ROWS)}
    )
    both.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"splits \['test', 'train'\]"):
        load_source(SourceConfig(corpus="files", path=tmp_path / "dd", text_column="body"))
    docs = load_source(SourceConfig(corpus="files", path=tmp_path / "dd" / "train", text_column="body"))
    assert len(docs) == 6


def test_per_owner_parquet_files(tmp_path, hf_cache):
    for owner in ("x", "y"):
        datasets.Dataset.from_dict({"text": [f"{owner} {i} " + "word " * 60 for i in range(10)]}).to_parquet(
            str(tmp_path / f"{owner}.parquet")
        )
    cfg = DataConfig(clients=[tmp_path / "x.parquet", tmp_path / "y.parquet"], seq_len=32, public_windows=0)
    data = build_owned_data(cfg, byte_tokenizer(), seed=0)
    assert [c.label_counts for c in data.clients] == [{"x": 10}, {"y": 10}]
