"""The config and the CLI's error boundary (issue 28): fast config errors, hardened YAML, overrides
that remove a setting, and ordinary conditions that end in one `error:` paragraph with exit 2."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cotune.cli.main import app, cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples/tiny-personalized.yaml"
CANARY = "CANARY_c0nf1g_s3cret"
runner = CliRunner()


class RunStarted(AssertionError):
    """A bad config got as far as starting a run."""


@pytest.fixture(autouse=True)
def _no_run_starts(monkeypatch):
    """A config these tests give must be refused before a run starts: fail at once instead of training."""
    import cotune.runtime.experiment as experiment

    def refuse(*args, **kwargs):
        raise RunStarted("a run started")

    monkeypatch.setattr(experiment, "run_experiment", refuse)


def _run(*args: str) -> tuple[int, str]:
    """`cotune run ARGS` through the whole error boundary (`cli()`): exit code and output, unwrapped."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(SystemExit) as ended:
        cli(["run", *args])
    return int(ended.value.code or 0), " ".join(out.getvalue().split())  # rich wraps long lines


def _config(tmp_path: Path, text: str, name: str = "exp.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.slow
def test_a_config_error_is_reported_without_importing_torch(tmp_path):
    """`cotune run` reads and validates the config before importing torch and the runtime (~5 s)."""
    bad = _config(tmp_path, "algorithm: personalized\nno_such_key: 1\n")
    code = (
        "import sys\nfrom cotune.cli.main import cli\n"
        f"try:\n    cli(['run', {bad!r}])\nexcept SystemExit as e:\n"
        "    print('exit', e.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "exit 2 False False" in done.stdout, done.stdout + done.stderr
    assert "unknown key 'no_such_key'" in " ".join(done.stderr.split())
    assert time.monotonic() - started < 30  # generous on a loaded machine; ~0.5 s when idle


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n", "null\n"])
def test_an_empty_config_is_refused_with_a_pointer_to_the_examples(tmp_path, text):
    code, out = _run(_config(tmp_path, text))
    assert code == 2 and "holds no settings" in out and "examples/tiny-personalized.yaml" in out, out


def test_the_top_level_must_be_a_mapping(tmp_path):
    code, out = _run(_config(tmp_path, f"- {CANARY}\n- b\n"))
    assert code == 2 and "the top level must be a mapping" in out and CANARY not in out, out


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("algorithm: personalized\nfederation:\n  rounds: 2\n  rounds: 3\n", ":4: duplicate key 'rounds'"),
        ("federation: {rounds: 2, rounds: 3}\n", ":1: duplicate key 'rounds'"),
        ("algorithm: personalized\nalgorithm: fedavg\n", ":2: duplicate key 'algorithm'"),
    ],
)
def test_duplicate_keys_are_refused_at_their_line(tmp_path, text, where):
    code, out = _run(_config(tmp_path, text))
    assert code == 2 and f"exp.yaml{where}" in out, out


def test_nested_aliases_are_refused_quickly_and_echo_nothing(tmp_path):
    lines = [f"a: &a [{', '.join([CANARY] * 9)}]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    lines.append("model: {name: *i}")  # 9^9 values once expanded
    path = _config(tmp_path, "\n".join(lines) + "\n")
    cli = [sys.executable, "-c", f"from cotune.cli.main import cli; cli(['run', {path!r}])"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=60)  # unbounded: hours, gigabytes
    out = " ".join(done.stderr.split())
    assert done.returncode == 2 and "expand to more than" in out, out[:2000]
    assert CANARY not in out and len(out) < 400, out[:2000]


def test_a_value_is_shown_bounded_in_a_validation_error(tmp_path):
    code, out = _run(_config(tmp_path, f"algorithm: personalized\ndevice: {CANARY * 50}\n"))
    assert code == 2 and "line 2: 'device'" in out and CANARY * 2 not in out and len(out) < 400, out


def test_validation_errors_name_the_line_of_the_setting(tmp_path):
    code, out = _run(_config(tmp_path, "algorithm: personalized\nfederation:\n  roundz: 3\n"))
    assert code == 2 and "line 3: unknown key 'federation.roundz'" in out, out


def test_malformed_yaml_names_file_and_line_and_quotes_no_text(tmp_path):
    code, out = _run(_config(tmp_path, f"algorithm: personalized\nmodel: {{name: {CANARY}\n  x: [\n"))
    assert code == 2 and "exp.yaml:3: the file is not valid YAML" in out and CANARY not in out, out


def test_a_config_that_is_not_utf8_or_not_a_file_is_refused(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"algorithm: personalized\nrun: {name: caf\xe9}\n")
    code, out = _run(str(path))
    assert code == 2 and "latin.yaml:2: not valid UTF-8" in out, out
    code, out = _run("/dev/null")
    assert code == 2 and "'/dev/null' is not a file" in out, out


def test_null_override_removes_a_setting_so_an_example_can_switch_to_per_owner_data(tmp_path):
    owners = []
    for i in range(4):
        (tmp_path / f"o{i}").mkdir()
        owners.append(str(tmp_path / f"o{i}"))
    from cotune.config import load_config

    cfg = load_config(
        EXAMPLE, ["data.sources=null", "data.partition=null", f"data.clients=[{', '.join(owners)}]"]
    )
    assert [str(p) for p in cfg.data.clients or []] == owners
    assert "sources" not in cfg.data.model_fields_set
    # a setting that can be null still is: clipping switched off
    assert load_config(EXAMPLE, ["train.max_grad_norm=null"]).train.max_grad_norm is None


def test_run_help_describes_config_overrides_and_backends():
    result = runner.invoke(app, ["run", "--help"], terminal_width=200)
    text = " ".join(result.output.split())
    assert result.exit_code == 0
    fragments = ("experiment YAML (see", "key=value settings over CONFIG", "target_modules=[q_proj,v_proj]")
    for fragment in (*fragments, "key=null removes a setting", "flower-simulation"):
        assert fragment in text, text


def test_run_help_lists_every_backend_of_the_registry():
    from cotune.runtime.backends import BACKENDS

    result = runner.invoke(app, ["run", "--help"], terminal_width=200)
    text = " ".join(result.output.replace("│", " ").split())  # the help box's borders, where it wraps
    for backend in BACKENDS.values():
        assert f"{backend.name} ({backend.summary})" in text, text


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--connect-timeout", "5"], "--connect-timeout needs --backend flower, not embedded"),
        (["--backend", "flower-simulation", "--superlink", "h:1"], "--superlink needs --backend flower, not"),
        (["--backend", "flower", "--client-gpus", "1"], "--client-gpus needs --backend flower-simulation"),
        (["--backend", "nope"], "unknown --backend 'nope': embedded, flower or flower-simulation"),
    ],
)
def test_an_option_of_another_backend_is_refused_before_the_run_starts(tmp_path, args, fragment):
    """Each backend takes only its own options (runtime/backends.py): another's is refused, not ignored."""
    code, out = _run(str(EXAMPLE), "--out", str(tmp_path / "r"), *args)
    assert code == 2 and fragment in out and "internal error" not in out, out
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.tiny.hidden_size=66", "model.tiny.hidden_size 66 is not divisible by model.tiny.num_heads 4"),
        ("model.tiny.num_kv_heads=3", "model.tiny.num_heads 4 is not divisible by model.tiny.num_kv_heads 3"),
        ("model.tiny.hidden_size=12", "hidden_size / num_heads = 3 must be even"),
    ],
)
def test_an_impossible_tiny_model_shape_is_a_config_error(tmp_path, override, fragment):
    code, out = _run(str(EXAMPLE), override, "--out", str(tmp_path / "r"))
    assert code == 2 and fragment in out and "internal error" not in out, out


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_a_device_this_machine_lacks_is_refused_before_the_run_starts(tmp_path, device):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    code, out = _run(str(EXAMPLE), f"device={device}", "--out", str(tmp_path / "r"))
    assert code == 2 and f"device '{device}' requested but" in out and "internal error" not in out, out
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_an_embedding_lora_target_is_a_clear_error(tmp_path, monkeypatch, target):
    monkeypatch.undo()  # this one is found when the model is built: let the run start
    small = ["federation.rounds=1", "run.compare=[]", "data.sources=[{corpus: bbc, max_docs: 8}]"]
    code, out = _run(
        str(EXAMPLE), f"lora.target_modules=[q_proj,{target}]", *small, "--out", str(tmp_path / "r")
    )
    assert code == 2 and f"lora.target_modules ['{target}']: the model's embeddings" in out, out
    assert "internal error" not in out


def test_an_error_message_is_printed_without_console_markup(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    monkeypatch.undo()  # the trackers are checked by the run, before any work
    code, out = _run(str(EXAMPLE), "run.loggers=[wandb]", "--out", str(tmp_path / "r"))
    assert code == 2 and "pip install -e '.[trackers]'" in out, out  # markup would eat "[trackers]"


def test_a_config_that_cannot_be_read_gets_read_advice_not_write_advice(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    path = Path(_config(tmp_path, "algorithm: personalized\n"))
    path.chmod(0)
    try:
        code, out = _run(str(path))
    finally:
        path.chmod(0o600)
    assert code == 2 and f"permission denied reading {path}" in out and "you can write" not in out, out


def test_an_os_error_without_a_file_name_says_how_to_find_it():
    import errno

    from cotune.cli.errors import os_error_text

    text = os_error_text(OSError(errno.EFBIG, "File too large"))
    assert text.startswith("File too large (errno 27)") and "--debug" in text and not text.endswith(":")
    named = os_error_text(OSError(errno.EFBIG, "File too large", "/runs/x/metrics.jsonl"))
    assert "/runs/x/metrics.jsonl" in named and "ulimit -f" in named


def test_permission_denied_on_reading_gives_read_advice(tmp_path, monkeypatch):
    """As root nothing is unreadable: the decision is checked with os.access answering as for a user."""
    import errno

    import cotune.cli.errors as errors

    existing = tmp_path / "corpus.txt"
    existing.write_text("x")
    monkeypatch.setattr(errors.os, "access", lambda path, mode: False)
    read = errors.os_error_text(PermissionError(errno.EACCES, "Permission denied", str(existing)))
    assert read.startswith(f"permission denied reading {existing}") and "you can write" not in read
    write = errors.os_error_text(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "new")))
    assert "choose a location you can write" in write


def test_every_ordinary_error_type_carries_the_one_marker():
    """cotune's ordinary error types derive from `cotune.errors.OrdinaryError` (and keep their usual base),
    so the CLI names them in one place: the boundary prints any of them as `error:`, exit 2."""
    from cotune.assets import AssetError
    from cotune.config import ConfigError
    from cotune.data.errors import DataError
    from cotune.errors import OrdinaryError
    from cotune.models.compat import TokenizerMismatchError
    from cotune.models.lora import LoraTargetError
    from cotune.runtime.flower import FlowerRunError
    from cotune.runtime.lock import RunDirBusy
    from cotune.runtime.rundir import ResumeError

    for kind in (AssetError, ConfigError, DataError, TokenizerMismatchError, LoraTargetError, FlowerRunError):
        assert issubclass(kind, OrdinaryError), kind
    assert issubclass(RunDirBusy, RuntimeError) and issubclass(ResumeError, OrdinaryError)


@pytest.mark.parametrize("kind", ["ResumeError", "RunDirBusy", "AssetError"])
def test_an_ordinary_runtime_error_is_an_error_paragraph_wherever_it_is_raised(tmp_path, monkeypatch, kind):
    """Not only where `cotune run` expects one: `cotune report` meeting a RuntimeError-based ordinary error
    (which report does not catch) still ends in `error:` and exit 2, not a bug report."""
    import cotune.assets
    import cotune.reporting.report as report
    import cotune.runtime.lock
    import cotune.runtime.rundir

    where = {
        "ResumeError": cotune.runtime.rundir,
        "RunDirBusy": cotune.runtime.lock,
        "AssetError": cotune.assets,
    }
    error = getattr(where[kind], kind)

    def refuse(*args, **kwargs):
        raise error("the run directory is held elsewhere: wait for it to finish")

    monkeypatch.setattr(report, "write_report", refuse)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(SystemExit) as ended:
        cli(["report", str(tmp_path)])
    text = " ".join(out.getvalue().split())
    assert ended.value.code == 2 and "error: the run directory is held elsewhere" in text, text
    assert "internal error" not in text
