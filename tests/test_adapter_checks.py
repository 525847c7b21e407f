"""Adapters read back are this run's (issue 28): a foreign, partial or non-finite adapter in a checkpoint
is damage (`--resume` falls back to the newest intact round) or a refusal (`eval`); training that diverges
stops the run; transformers' loading bar stays out of piped logs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tests.conftest import tiny_tree
from tests.test_run_safety import cotune

from cotune.cli.main import cli
from cotune.config.schema import ModelConfig
from cotune.models.loader import load_base_model
from cotune.models.tiny import build_tiny_model, byte_tokenizer
from cotune.runtime.checkpoint import list_checkpoints

CANARY = "okapi-canary-5521"  # planted in a foreign adapter: it must never be printed


@pytest.fixture(scope="module")
def finished(corpus_dir, tmp_path_factory) -> Path:
    """A tiny personalized run of two rounds (run once, copied by each test)."""
    root = tmp_path_factory.mktemp("adapters")
    tree = tiny_tree(
        corpus_dir, root, federation={"clients": 2, "rounds": 2, "local_steps": 1, "warmup_steps": 0}
    )
    cfg = root / "exp.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    with pytest.raises(SystemExit) as done:
        cli(["run", str(cfg), "--out", str(root / "run")])
    assert not done.value.code
    return root / "run"


def interrupted_copy(finished: Path, tmp_path: Path) -> Path:
    """The finished run as if it had been stopped after its last checkpoint (no end record)."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    metrics = out / "metrics.jsonl"
    metrics.write_text("".join(ln + "\n" for ln in metrics.read_text().splitlines() if '"end"' not in ln))
    return out


def squeezed(text: str) -> str:
    """`text` without whitespace: the console wraps long paths anywhere."""
    return "".join(text.split())


def last_adapter(run_dir: Path, client: str = "client-01") -> Path:
    return list_checkpoints(run_dir)[-1][1] / client / "adapter_model.safetensors"


def foreign(path: Path) -> None:
    """Another model's adapter (wider layers) under this run's keys, one extra weight named with a canary."""
    state = {
        k: torch.zeros(v.shape[0] + (8 if "lora_B" in k else 0), v.shape[1] + (8 if "lora_A" in k else 0))
        for k, v in load_file(str(path)).items()
    }
    state[f"{CANARY}.lora_A.weight"] = torch.zeros(2, 40)
    state[f"{CANARY}.lora_B.weight"] = torch.zeros(40, 2)
    save_file(state, str(path))


def nan(path: Path) -> None:
    state = load_file(str(path))
    for v in state.values():
        v.fill_(float("nan"))
    save_file(state, str(path))


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (foreign, "client-01: its weights are not this model's LoRA weights (0 missing, 2 unexpected)"),
        (nan, "client-01: 4 weight(s) hold NaN or infinite values"),
        (lambda p: p.unlink(), "client-01: no adapter file"),
    ],
    ids=["foreign-shape", "nan", "missing"],
)
@pytest.mark.slow
def test_resume_skips_a_checkpoint_with_a_foreign_nan_or_missing_adapter(
    capsys, finished, tmp_path, damage, what
):
    out = interrupted_copy(finished, tmp_path)
    damage(last_adapter(out))
    code, text = cotune(capsys, "run", "--resume", out)
    assert code == 0, text
    assert f"warning: skipped damaged checkpoint(s) round-0002 ({what}" in text
    assert "resuming from round 1" in text and CANARY not in text
    want, got = load_file(str(last_adapter(finished))), load_file(str(last_adapter(out)))
    assert all(torch.equal(want[k], got[k]) for k in want)  # round 2 run again, to the same bits


def test_eval_refuses_a_nan_adapter_naming_the_file(capsys, finished, tmp_path):
    out = interrupted_copy(finished, tmp_path)
    nan(last_adapter(out))
    task = tmp_path / "task.jsonl"
    task.write_text('{"prompt": "q?", "choices": ["a", "b"], "answer": 0}\n')
    code, text = cotune(capsys, "eval", out, "--task", task, "--client", "1")
    assert code == 2, text
    want = f"error: {last_adapter(out)} is not an adapter of this run: 4 weight(s) hold NaN"
    assert squeezed(want) in squeezed(text)
    assert "Traceback" not in text


def test_eval_refuses_an_adapter_of_another_model(capsys, finished, tmp_path):
    out = interrupted_copy(finished, tmp_path)
    foreign(last_adapter(out))
    code, text = cotune(capsys, "generate", out, "apple", "--client", "1", "--max-new-tokens", "2")
    assert code == 2, text
    want = f"error: {last_adapter(out)} is not an adapter of this run: its weights are not"
    assert squeezed(want) in squeezed(text)
    assert CANARY not in text


@pytest.mark.slow
def test_a_learning_rate_that_explodes_the_update_stops_the_run_keeping_round_0(capsys, corpus_dir, tmp_path):
    """train.lr=10 on the tiny model: the loss stays near log(vocab) (where a random model starts), but the
    update drowns the model; before, the run ended with exit 0 and no word."""
    tree = tiny_tree(corpus_dir, tmp_path, federation={"clients": 2, "rounds": 2, "local_steps": 3})
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    code, text = cotune(capsys, "run", cfg, "train.lr=10", "--out", tmp_path / "run")
    assert code == 2, text
    assert "error: training diverged: client-00 in round 1: its update exploded" in text
    assert "checkpoints of round 0 are kept" in text and "lower train.lr (this run's is 10)" in text
    assert [r for r, _ in list_checkpoints(tmp_path / "run")] == [0]


@pytest.mark.slow
def test_a_run_that_expects_untrusted_clients_screens_an_exploded_update_instead_of_stopping(
    capsys, corpus_dir, tmp_path
):
    """With robustness.max_update_norm the same exploded updates are rejected by the screening (one
    faulty client must not stop a federation built to withstand it); with all of them rejected, too few
    clients are left and the run stops that way (exit 3), not as a divergence."""
    tree = tiny_tree(corpus_dir, tmp_path, federation={"clients": 2, "rounds": 2, "local_steps": 3})
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    code, text = cotune(
        capsys, "run", cfg, "train.lr=10", "robustness.max_update_norm=1.0", "--out", tmp_path / "run"
    )
    assert "training diverged" not in text
    assert code == 3, text
    rejected = [
        line
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"update_rejected"' in line
    ]
    assert rejected


def test_loading_a_saved_model_prints_no_progress_bar(capfd, tmp_path):
    tokenizer = byte_tokenizer()
    model = build_tiny_model(ModelConfig(name="tiny").tiny, len(tokenizer))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    capfd.readouterr()
    load_base_model(ModelConfig(name=str(tmp_path / "m")), torch.device("cpu"), torch.float32)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "\r" not in err and "it/s]" not in err, err


def test_a_round_stops_only_when_every_client_diverged():
    """One client's exploded or non-finite upload is one bad upload among good ones (the screening's);
    when every client of the round diverged, the cause is the run's settings and the run stops."""
    from cotune.training.divergence import TrainingDiverged, check_round

    start = {"m.lora_A.weight": torch.zeros(2, 8), "m.lora_B.weight": torch.zeros(8, 2)}
    fine = {"m.lora_A.weight": torch.full((2, 8), 0.01), "m.lora_B.weight": torch.full((8, 2), 0.01)}
    exploded = {"m.lora_A.weight": torch.full((2, 8), 30.0), "m.lora_B.weight": torch.full((8, 2), 30.0)}
    nan = {**fine, "m.lora_B.weight": torch.full((8, 2), float("nan"))}
    check_round(2, {"client-00": (3.0, fine, start), "client-01": (3.0, exploded, start)}, 2.0, "train.lr")
    check_round(2, {"client-00": (3.0, nan, start), "client-01": (3.0, fine, start)}, 2.0, "train.lr")
    with pytest.raises(TrainingDiverged, match=r"client-00 in round 2: its update exploded .*1 other client"):
        check_round(2, {"client-00": (3.0, exploded, start), "client-01": (3.0, nan, start)}, 2.0, "train.lr")
    with pytest.raises(TrainingDiverged, match="loss is not finite"):
        check_round(1, {"client-03": (float("nan"), fine, start)}, 2.0, "train.lr")


def test_checkpoint_files_get_normal_permissions(finished):
    """safetensors writes its files 0600; a checkpoint's weights get a normal file's mode (under the
    umask), like every other file of the run, so whoever may read the run directory may use them."""
    from cotune.reporting.files import DIR_MODE, FILE_MODE, umask

    mask = umask()
    for path in (finished / "checkpoints").rglob("*"):
        want = (DIR_MODE if path.is_dir() else FILE_MODE) & ~mask
        assert path.stat().st_mode & 0o777 == want, path
