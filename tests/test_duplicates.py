"""Duplicated documents dropped before any split (issue 31, item 5): every task built from a corpus
(topic tasks, text windows, shipped generation tasks; the shipped corpora and the user's files) keeps the
first copy of a document, counts the others, and says how many in its start output and start record,
never quoting them."""

from __future__ import annotations

import random
from pathlib import Path

import yaml
from tests.conftest import WORDS, tiny_tree
from tests.test_cotuning import records, tree
from typer.testing import CliRunner

from cotune.cli.main import app
from cotune.config.schema import DataConfig, SourceConfig, TaskConfig
from cotune.data.corpora import read_documents
from cotune.data.task_data import build_task_data
from cotune.data.windows import federated_data
from cotune.models.tiny import byte_tokenizer

CANARY = "CANARY-5d1e-duplicated-private-text"
runner = CliRunner()


def corpus(root: Path, n: int = 10, copies: int = 0) -> Path:
    """Four labels of `n` distinct files each; the first `copies` files of every label copied again
    under a later name, with other whitespace (the same document: `duplicates.same_text`)."""
    rng = random.Random(1)
    for label, words in WORDS.items():
        (root / label).mkdir(parents=True)
        for i in range(n):
            text = f"{CANARY} {label} {i} " + " ".join(rng.choice(words) for _ in range(40))
            (root / label / f"{i:03d}.txt").write_text(text)
            if i < copies:
                (root / label / f"z{i:03d}.txt").write_text("\n  " + text.replace(" ", "\n", 3) + "  \n")
    return root


def test_a_duplicated_file_is_read_once_and_counted(tmp_path: Path) -> None:
    root = corpus(tmp_path / "c", n=3)
    (root / "beta" / "zz-copy.txt").write_text((root / "beta" / "001.txt").read_text() + "\r\n")
    read = read_documents([SourceConfig(corpus="files", path=root)])
    assert read.duplicates == 1 and len(read.items) == 12
    assert len({" ".join(d.text.split()) for d in read.items}) == 12
    # the first copy is kept, in the corpus's (sorted) order
    assert [d.text for d in read.items if d.label == "beta"] == [
        (root / "beta" / f"{i:03d}.txt").read_text() for i in range(3)
    ]


def test_duplicates_across_sources_are_dropped_too(tmp_path: Path) -> None:
    a, b = corpus(tmp_path / "a", n=2), tmp_path / "b"
    b.mkdir()
    (b / "copy.txt").write_text((a / "gamma" / "000.txt").read_text())
    read = read_documents([SourceConfig(corpus="files", path=a), SourceConfig(corpus="files", path=b)])
    assert read.duplicates == 1 and len(read.items) == 8


def test_a_topic_task_never_puts_one_document_in_training_and_test(tmp_path: Path) -> None:
    root = corpus(tmp_path / "c", n=10, copies=6)  # 24 of 64 files are copies
    cfg = TaskConfig(source=SourceConfig(corpus="files", path=root), test_fraction=0.3, max_length=200)
    task = build_task_data(cfg, 3, byte_tokenizer(), seed=0)
    training = [ex.prompt for part in [task.splits.public, *task.splits.clients] for ex in part]
    test = [ex.prompt for ex in task.splits.test]
    assert not set(training) & set(test)
    assert len(training) + len(test) == 40 and task.duplicate_documents == 24


def test_text_windows_count_the_dropped_documents(tmp_path: Path) -> None:
    root = corpus(tmp_path / "c", n=10, copies=2)
    data = federated_data(DataConfig(path=root, seq_len=32, public_windows=2), 4, byte_tokenizer(), 0)
    assert data.duplicate_documents == 8
    # every client's documents are distinct ones: 40 in all, less those the public set took
    assert sum(n for c in data.clients for n in c.label_counts.values()) <= 40


def run_cli(tmp_path: Path, t: dict) -> tuple[int, str, Path]:
    path, out = tmp_path / "exp.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(t))
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    return result.exit_code, " ".join(result.output.split()), out


def test_the_start_output_and_record_say_how_many_documents_were_dropped(tmp_path: Path) -> None:
    root = corpus(tmp_path / "c", n=8)
    (root / "gamma" / "zz-copy.txt").write_text((root / "gamma" / "003.txt").read_text())
    t = tiny_tree(root, tmp_path, federation={"rounds": 1, "local_steps": 1, "warmup_steps": 0})
    code, out, run = run_cli(tmp_path, t)
    assert code == 0, out
    assert "data: 1 duplicated document(s) (same text) dropped before the split" in out
    assert CANARY not in out
    (start,) = [r for r in records(run, "run") if r["event"] == "start"]
    assert start["duplicates"] == {"documents": 1, "examples": 0}


def test_a_fedcollm_topic_task_says_how_many_documents_were_dropped(tmp_path: Path) -> None:
    root = corpus(tmp_path / "c", n=6, copies=1)
    t = tree(Path("unused"), tmp_path, algorithm="fedavg", federation={"rounds": 1, "local_steps": 1})
    t["task"] = {"source": {"corpus": "files", "path": str(root)}, "test_fraction": 0.3, "max_length": 200}
    code, out, run = run_cli(tmp_path, t)
    assert code == 0, out
    assert "task: 4 duplicated document(s) (same text) dropped before the split" in out
    assert CANARY not in out
    (start,) = [r for r in records(run, "run") if r["event"] == "start"]
    assert start["duplicates"] == {"documents": 4, "examples": 0}
