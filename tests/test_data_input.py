"""Data input (issue 28): every data problem found before the model loads and reported at once; only
regular files read from data folders; text-like suffixes; long texts in bounded memory; table errors
that name the file; no table build left in the temp dir by a killed reader; data.text_column."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from tests.conftest import tiny_tree
from tests.test_cotuning import task_file, tree  # noqa: F401  (task_file is a fixture)
from typer.testing import CliRunner

import cotune.runtime.embedded as embedded
from cotune.cli.main import app
from cotune.config.schema import DataConfig, SourceConfig
from cotune.data import files, tables, windows
from cotune.data.corpora import Document, load_documents, load_source
from cotune.data.errors import DataError
from cotune.data.tables import builds_root, load_table
from cotune.data.windows import build_owned_data, text_chunks, tokenize
from cotune.models.tiny import byte_tokenizer

CANARY = "CANARY-7f3a-private-text"
runner = CliRunner()


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (opening a FIFO blocks until a writer comes)."""

    def expired(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model load fails the test: the data problems must be found before it."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(embedded, "load_model", refuse)
    monkeypatch.setattr(embedded, "load_fedcollm_models", refuse)


def owner(root: Path, name: str, n: int = 6, suffix: str = ".txt") -> Path:
    d = root / name
    d.mkdir(parents=True)
    for i in range(n):
        # distinct documents (copies would be dropped as duplicates)
        (d / f"{i}{suffix}").write_text(f"doc{i} " + " ".join(f"word{j % 17}" for j in range(80)))
    return d


def run(tmp_path: Path, tree_: dict, *overrides: str) -> tuple[int, str]:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tree_))
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "runs" / "x"), *overrides])
    return result.exit_code, result.output


def owners_tree(corpus_dir: Path, tmp_path: Path, clients: list[Path]) -> dict:
    t = tiny_tree(corpus_dir, tmp_path, federation={"clients": len(clients)})
    del t["data"]["path"]
    t["data"]["public_windows"] = 0
    t["data"]["clients"] = [str(c) for c in clients]
    return t


# --- 1. preflight ------------------------------------------------------------------------------------


def test_every_bad_client_path_is_named_in_one_error_before_the_model_loads(
    corpus_dir: Path, tmp_path: Path, no_model: None
) -> None:
    good = owner(tmp_path, "good")
    binary = tmp_path / "binaries"
    binary.mkdir()
    (binary / "blob.bin").write_bytes(CANARY.encode())
    clients = [good, tmp_path / "missing-owner", binary]
    code, out = run(tmp_path, owners_tree(corpus_dir, tmp_path, clients))
    text = " ".join(out.split())
    assert code == 2, out
    assert "2 data problem(s)" in text and "before loading the model" in text
    assert "data.clients[1]" in text and "missing-owner" in text and "does not exist" in text
    assert "data.clients[2]" in text and "only .bin files" in text
    assert "data.clients[0]" not in text
    assert CANARY not in out and "Traceback" not in out
    assert not (tmp_path / "runs" / "x").exists()


def test_task_file_problems_name_file_and_line_all_at_once(
    task_file: Path,  # noqa: F811
    tmp_path: Path,
    no_model: None,
) -> None:
    bad = tmp_path / "bad.jsonl"
    rows = [
        {"prompt": CANARY, "choices": [" a", " b"], "answer": 0},
        {"prompt": CANARY, "choices": [" a", " b"], "answer": 5},
        {"prompt": CANARY, "choices": " a", "answer": 0},
    ]
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n{" + CANARY + "\n")
    t = tree(task_file, tmp_path)
    t["task"] = {
        "clients": [str(task_file), str(bad), str(tmp_path / "gone.jsonl")],
        "public": str(task_file),
    }
    t["task"]["test"] = str(task_file)
    code, out = run(tmp_path, t)
    text = " ".join(out.split())
    assert code == 2, out
    assert f"task.clients[1]: {bad}:2: 'answer' 5 is out of range" in text
    assert f"{bad}:3: 'choices' must be a list" in text and f"{bad}:4: invalid JSON" in text
    assert "task.clients[2]" in text and "gone.jsonl: does not exist" in text
    assert CANARY not in out and "Traceback" not in out


# --- 2. text-like suffixes ---------------------------------------------------------------------------


def test_a_folder_of_python_files_is_data(tmp_path: Path) -> None:
    code = owner(tmp_path, "code", suffix=".py")
    (code / "notes.md").write_text("# notes\n\nsome words here")
    (code / "image.png").write_bytes(b"\x89PNG")
    docs = load_source(SourceConfig(corpus="files", path=code))
    assert sorted(Path(d.source).suffix for d in docs) == [".md"] + [".py"] * 6


def test_a_folder_with_nothing_readable_names_the_suffixes_found(tmp_path: Path) -> None:
    d = tmp_path / "pictures"
    d.mkdir()
    (d / "a.png").write_bytes(b"x")
    (d / "b.pdf").write_bytes(b"x")
    with pytest.raises(DataError, match=r"only \.pdf, \.png files.*\.txt .*\.py"):
        load_source(SourceConfig(corpus="files", path=d))


# --- 3. only regular files ---------------------------------------------------------------------------


def test_special_files_are_named_and_refused_unopened(tmp_path: Path) -> None:
    d = owner(tmp_path, "owner")
    os.mkfifo(d / "pipe.txt")
    os.symlink("/dev/zero", d / "zero.txt")
    with deadline(20), pytest.raises(DataError) as err:
        load_documents([SourceConfig(corpus="files", path=d)])
    assert "pipe.txt: a FIFO (named pipe), not a regular file" in str(err.value)
    assert "zero.txt: a character device" in str(err.value)


def test_a_fifo_given_as_the_data_path_does_not_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "notes.txt")
    with deadline(20), pytest.raises(DataError, match="FIFO"):
        load_documents([SourceConfig(corpus="files", path=tmp_path / "notes.txt")])


def test_links_to_files_are_read_and_folder_link_loops_end(tmp_path: Path) -> None:
    d = owner(tmp_path, "owner", n=2)
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("linked words")
    os.symlink(outside, d / "linked.txt")
    os.symlink(d, d / "loop")  # owner/loop -> owner: a cycle
    with deadline(20):
        docs = load_documents([SourceConfig(corpus="files", path=d)])
    assert len(docs) == 3


# --- 4. large files ----------------------------------------------------------------------------------


def test_long_text_is_cut_at_word_boundaries_and_tokenised_alike() -> None:
    text = " ".join(f"w{i}" for i in range(5000)) + "\n  spaced  out " + "x" * 3000
    pieces = text_chunks(text, size=1000)
    assert "".join(pieces) == text and all(len(p) <= 1000 for p in pieces)
    assert all(p.startswith(" ") for p in pieces[1:-3])  # the last 3: a 3000-char word, cut hard
    tok = byte_tokenizer()
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert tokenize([Document(text, "a", "s")], tok)[0].tolist() == whole


def test_one_long_single_line_owner_file_trains_in_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(windows, "CHUNK_CHARS", 4096)
    notes = tmp_path / "notes.txt"
    notes.write_text(" ".join(f"word{i % 101}" for i in range(40_000)))  # ~300 KB, one line
    data = build_owned_data(DataConfig(clients=[notes], seq_len=32), byte_tokenizer(), seed=0)
    assert len(data.clients[0].train) > 100 and data.label_names == ["notes"]


def test_a_text_file_over_the_limit_is_refused_naming_file_and_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "MAX_TEXT_BYTES", 1 << 20)
    big = tmp_path / "big.txt"
    big.write_text(CANARY * ((2 << 20) // len(CANARY) + 1))
    with pytest.raises(DataError) as err:
        load_documents([SourceConfig(corpus="files", path=big)])
    assert f"{big}: 2 MiB is over the 1 MiB limit" in str(err.value) and CANARY not in str(err.value)


# --- 5. malformed tables -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,content", [("bad.csv", f'text\n"{CANARY}\n'), ("bad.json", '{"text": "' + CANARY)]
)
def test_a_malformed_table_is_an_error_naming_the_file(
    corpus_dir: Path, tmp_path: Path, name: str, content: str
) -> None:
    d = owner(tmp_path, "good")
    bad = tmp_path / name
    bad.write_text(content)
    code, out = run(tmp_path, owners_tree(corpus_dir, tmp_path, [d, bad]))
    text = " ".join(out.split())
    assert code == 2, out
    assert "error:" in text and f"{bad}: cannot be read as {name[4:]}" in text
    assert CANARY not in out and "Traceback" not in out and "bug" not in out


# --- 6. table builds after a kill --------------------------------------------------------------------


def test_a_killed_readers_table_build_is_removed_by_the_next_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    root = builds_root()
    dead = root / "999999999-killed"  # no such pid: its reader was SIGKILLed mid-build
    (dead / "rows").mkdir(parents=True)
    (dead / "rows" / "data.arrow").write_text(CANARY)
    alive = root / f"{os.getppid()}-running"
    alive.mkdir()
    table = tmp_path / "t.csv"
    table.write_text("text\nhello\n")
    assert load_table(table).column_names == ["text"]
    assert not dead.exists() and alive.exists()
    assert [p.name for p in root.iterdir()] == [alive.name]  # this read's own build is gone too
    assert tables.clean_stale_builds  # the one cleaner, called by every build


# --- 7. data.text_column -----------------------------------------------------------------------------


def test_owner_tables_name_their_text_column(corpus_dir: Path, tmp_path: Path, no_model: None) -> None:
    owners = []
    for name in ("a", "b"):
        f = tmp_path / f"{name}.csv"
        f.write_text("body,other\n" + "\n".join(f"row {i} of {name} words,x" for i in range(12)) + "\n")
        owners.append(f)
    t = owners_tree(corpus_dir, tmp_path, owners)
    code, out = run(tmp_path, t)
    text = " ".join(out.split())
    assert code == 2 and "2 data problem(s)" in text, out
    assert (
        f"data.clients[1]: {owners[1]}: no column 'text' (it has: body, other); name the right one with "
        "data.text_column" in text
    )
    t["data"]["text_column"] = "body"
    config = DataConfig(clients=owners, seq_len=8, text_column="body")
    data = build_owned_data(config, byte_tokenizer(), seed=0)
    assert data.label_names == ["a", "b"] and len(data.clients[0].train) > 0


def test_data_text_column_without_owners_is_refused(corpus_dir: Path, tmp_path: Path) -> None:
    code, out = run(tmp_path, tiny_tree(corpus_dir, tmp_path), "data.text_column=body")
    assert code == 2 and "data.text_column" in out and "needs data.clients" in " ".join(out.split()), out


def test_a_saved_per_owner_config_loads_back_and_shared_data_settings_are_still_refused(
    corpus_dir: Path, tmp_path: Path
) -> None:
    """A run's config.yaml spells out every setting (data.sources, data.partition at their defaults): with
    data.clients it must load back (resume, cotune eval / generate, the config a Flower ServerApp sends
    its SuperNodes); a data.sources or data.path set beside data.clients is still refused."""
    from cotune.config import ConfigError, config_from_dict, dump_config, load_config

    owners = [str(corpus_dir / "alpha"), str(corpus_dir / "beta")]
    t = tiny_tree(corpus_dir, tmp_path, federation={"clients": 2})
    del t["data"]["path"]
    t["data"]["clients"] = owners
    cfg = config_from_dict(t)
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg))
    assert load_config(saved) == cfg
    for extra in ({"path": str(corpus_dir / "alpha")}, {"sources": [{"corpus": "files", "path": owners[0]}]}):
        with pytest.raises(ConfigError, match=r"data\.clients gives every client its own data"):
            config_from_dict({**t, "data": {**t["data"], **extra}})
