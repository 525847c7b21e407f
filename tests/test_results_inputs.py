"""`cotune generate` / `eval` / `export` under ordinary mistakes and hostile run directories: one `error:`
paragraph and exit 2 before any model loads, never user text in the output; chat templates; task columns;
what an export contains and with which permissions."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import tiny_tree
from tests.test_run_safety import cotune

from cotune.config import config_from_dict
from cotune.runtime import results
from cotune.runtime.experiment import run_experiment
from cotune.runtime.rundir import list_checkpoints

CANARY = "CANARY-7f3e-private-text"
LOADED = "parameters on"  # what the model loader prints: a refusal must come before it
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"


@pytest.fixture(scope="module")
def run_dir(corpus_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("results-inputs")
    cfg = config_from_dict(tiny_tree(corpus_dir, tmp, federation={"clients": 2, "rounds": 1}))
    return run_experiment(cfg, tmp / "run")[0]


@pytest.fixture
def copy_of(run_dir, tmp_path) -> Path:
    """A copy of the run to damage."""
    return Path(shutil.copytree(run_dir, tmp_path / "copy"))


def newest_adapter(run_dir: Path, name: str = "client-00") -> Path:
    return list_checkpoints(run_dir)[-1][1] / name


def task_rows(n: int = 6) -> list[dict]:
    return [
        {"question": f"colour {w}. Which colour?", "options": [" red", " blue"], "gold": i % 2}
        for i, w in enumerate(["red", "blue"] * (n // 2))
    ]


def commands(run: Path, tmp_path: Path) -> Iterator[list[object]]:
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": "p", "choices": [" a", " b"], "answer": 0}) + "\n")
    yield ["generate", run, "hello", "--client", "0"]
    yield ["eval", run, "--task", task, "--client", "0"]
    yield ["export", run, tmp_path / "out", "--client", "0"]


def refused(code: int, text: str, *needles: str) -> None:
    assert code == 2, text
    assert text.startswith("error:") and "internal error" not in text and LOADED not in text, text
    assert CANARY not in text
    for needle in needles:
        assert needle in text, text


@pytest.mark.parametrize("kind", ["file", "missing", "empty", "not-a-config", "not-yaml", "not-utf8"])
def test_a_path_that_is_no_run_directory_is_refused_by_every_command(capsys, tmp_path, kind):
    path = tmp_path / "given"
    if kind == "file":
        path.write_text(CANARY)
    elif kind != "missing":
        path.mkdir()
    config = path / "config.yaml"
    if kind == "not-a-config":
        config.write_text(f"greeting: {CANARY}\n")
    elif kind == "not-yaml":
        config.write_text(f"a: [{CANARY}\n")
    elif kind == "not-utf8":
        config.write_bytes(b"model: {name: \xff\xfe}\n" + CANARY.encode())
    for args in commands(path, tmp_path):
        code, text = cotune(capsys, *args)
        refused(code, text, str(path))


def test_a_run_without_an_intact_checkpoint_or_the_named_adapter_is_refused(capsys, copy_of, tmp_path):
    shutil.rmtree(newest_adapter(copy_of, "client-01"))
    code, text = cotune(capsys, "generate", copy_of, "hello", "--client", "1")
    refused(code, text, "holds no adapter 'client-01'")
    shutil.rmtree(copy_of / "checkpoints")
    for args in commands(copy_of, tmp_path):
        refused(*cotune(capsys, *args), "no intact checkpoint")


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_an_empty_prompt_is_refused_before_the_model_loads(capsys, run_dir, prompt):
    refused(*cotune(capsys, "generate", run_dir, prompt, "--client", "0"), "the prompt is empty")


@pytest.mark.parametrize("client", ["2", "-1", "99"])
def test_a_client_out_of_range_is_refused_before_the_model_loads(capsys, run_dir, tmp_path, client):
    for args in commands(run_dir, tmp_path):
        args[-1] = client
        refused(*cotune(capsys, *args), "this run has clients 0..1")


def test_a_prompt_longer_than_the_model_reads_is_refused(capsys, run_dir):
    code, text = cotune(capsys, "generate", run_dir, "hello", "--client", "0", "--max-new-tokens", "600")
    assert code == 2 and "reads at most 512 tokens" in text, text


def test_generate_applies_a_chat_template_quietly(capsys, monkeypatch, run_dir, recwarn):
    """transformers 5 answers apply_chat_template(tokenize=True) with a mapping; every real model has a
    template, the tiny one gets one here."""
    load_model = results.load_model

    def with_template(*args, **kwargs):
        model, tokenizer, device = load_model(*args, **kwargs)
        tokenizer.chat_template = TEMPLATE
        return model, tokenizer, device

    monkeypatch.setattr(results, "load_model", with_template)
    code, text = cotune(capsys, "generate", run_dir, "hello", "--client", "0", "--max-new-tokens", "4")
    assert code == 0, text
    assert "warn" not in text.lower() and "error" not in text.lower(), text
    assert not [w for w in recwarn if "generat" in str(w.message).lower()]
    tuned = results.open_tuned(run_dir, client=0)
    tuned.tokenizer.chat_template = TEMPLATE
    ids = results.prompt_ids(tuned.tokenizer, "hello")
    assert ids and all(isinstance(i, int) for i in ids)
    assert ids == tuned.tokenizer.encode("<|user|>hello\n<|assistant|>")


def test_eval_reads_a_table_with_its_own_column_names(capsys, run_dir, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps(r) for r in task_rows()))
    columns = "prompt=question,choices=options,answer=gold"
    code, text = cotune(capsys, "eval", run_dir, "--task", task, "--client", "0", "--columns", columns)
    assert code == 0 and "(n=6)" in text, text
    csv = tmp_path / "task.csv"
    csv.write_text(
        "question,options,gold\n" + "".join(f'q{i},"["" a"", "" b""]",{i % 2}\n' for i in range(4))
    )
    code, text = cotune(
        capsys, "eval", run_dir, "--task", csv, "--client", "0", "--columns", "prompt=question",
        "--columns", "choices=options,answer=gold",
    )  # fmt: skip
    assert code == 0 and "(n=4)" in text, text
    refused(*cotune(capsys, "eval", run_dir, "--task", csv, "--client", "0"), "no column 'prompt'")


@pytest.mark.parametrize(
    "spec, needle",
    [("prompt", "FIELD=COLUMN"), ("question=prompt", "unknown field"), ("prompt=a,prompt=b", "twice")],
)
def test_eval_refuses_bad_columns_and_a_bad_task_before_the_model_loads(
    capsys, run_dir, tmp_path, spec, needle
):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": CANARY, "choices": [" a"], "answer": 0}) + "\n")
    refused(*cotune(capsys, "eval", run_dir, "--task", task, "--client", "0", "--columns", spec), needle)
    refused(*cotune(capsys, "eval", run_dir, "--task", task, "--client", "0"), f"{task}:1")
    refused(
        *cotune(capsys, "eval", run_dir, "--task", tmp_path / "none.jsonl", "--client", "0"), "none.jsonl"
    )


def test_export_takes_only_the_adapter_files_names_the_base_and_writes_normal_modes(
    capsys, copy_of, tmp_path
):
    adapter = newest_adapter(copy_of)
    (adapter / "evil.pkl").write_bytes(b"\x80\x04" + CANARY.encode())
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04" + CANARY.encode())
    for path in [*adapter.iterdir(), adapter]:
        path.chmod(0o700 if path.is_dir() else 0o600)
    old = os.umask(0o022)
    try:
        code, text = cotune(capsys, "export", copy_of, tmp_path / "out" / "adapter", "--client", "0")
    finally:
        os.umask(old)
    assert code == 0, text
    assert "warning: not exported" in text and "'evil.pkl'" in text and "'adapter_model.bin'" in text, text
    out = tmp_path / "out" / "adapter"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (out / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny" and config["r"] == 2
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in out.iterdir())
    assert stat.S_IMODE(out.stat().st_mode) == 0o755

    old = os.umask(0o077)  # a stricter umask is respected, also by --merge
    try:
        code, text = cotune(capsys, "export", copy_of, tmp_path / "merged", "--client", "0", "--merge")
    finally:
        os.umask(old)
    assert code == 0, text
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (tmp_path / "merged").iterdir())


@pytest.mark.parametrize("damage", ["not-json", "not-utf8", "a-folder", "missing", "wrong-rank", "not-lora"])
def test_export_refuses_a_damaged_adapter_config(capsys, copy_of, tmp_path, damage):
    config = newest_adapter(copy_of) / "adapter_config.json"
    good = json.loads(config.read_text())
    config.unlink()
    if damage == "not-json":
        config.write_text("{" + CANARY)
    elif damage == "not-utf8":
        config.write_bytes(b"\xff\xfe" + CANARY.encode())
    elif damage == "a-folder":
        config.mkdir()
    elif damage == "wrong-rank":
        config.write_text(json.dumps({**good, "r": 3}))
    elif damage == "not-lora":
        config.write_text(json.dumps([CANARY]))
    code, text = cotune(capsys, "export", copy_of, tmp_path / "out", "--client", "0")
    assert code == 2 and text.startswith("error:") and "adapter_config.json" in text, text
    assert CANARY not in text and "internal error" not in text
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_export_refuses_an_output_with_content_before_the_model_loads(capsys, run_dir, tmp_path):
    target = tmp_path / "taken"
    target.write_text(CANARY)
    refused(*cotune(capsys, "export", run_dir, target, "--client", "0"), "exists and is not empty")


def test_a_model_asset_that_cannot_be_had_is_an_ordinary_error(capsys, monkeypatch, run_dir, tmp_path):
    """AssetError is a RuntimeError: these commands reported it as a bug (exit 1)."""
    from cotune.assets import AssetError

    def offline(*args, **kwargs):
        raise AssetError("asset smollm2-135m-instruct is not cached and PyPI cannot be reached: fetch it")

    monkeypatch.setattr(results, "load_model", offline)
    for args in commands(run_dir, tmp_path):
        code, text = cotune(capsys, *args)
        assert code == 2 and text.startswith("error: asset") and "internal error" not in text, text
