"""Run directories, resume and errors as a user meets them at the `cotune` command (issue 12)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tests.conftest import tiny_tree

from cotune.cli.main import cli
from cotune.reporting.metrics import load_run
from cotune.runtime.checkpoint import list_checkpoints, write_checkpoint
from cotune.runtime.lock import run_lock

SECRET = "zebra-quokka-4711"  # a phrase of the user's private text: it must never be printed


def cotune(capsys, *args: str) -> tuple[int, str]:
    """Run the `cotune` console script in process; (exit code, stdout + stderr on one line)."""
    with pytest.raises(SystemExit) as done:
        cli([str(a) for a in args])
    cap = capsys.readouterr()
    return int(done.value.code or 0), " ".join((cap.out + cap.err).split())


def config(tmp_path: Path, corpus_dir: Path, **sections) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_tree(corpus_dir, tmp_path, **sections)))
    return path


def adapters(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    last = list_checkpoints(run_dir)[-1][1]
    return {d.name: load_file(str(d / "adapter_model.safetensors")) for d in sorted(last.glob("client-*"))}


# ---- one process per run directory ---------------------------------------------------------------
def test_a_run_directory_in_use_is_refused_naming_its_holder(capsys, corpus_dir, tmp_path):
    out = tmp_path / "run"
    cfg = config(tmp_path, corpus_dir, federation={"rounds": 1})
    assert cotune(capsys, "run", cfg, "--out", out)[0] == 0
    shutil.rmtree(out / "checkpoints" / "round-0001")  # resumable
    with run_lock(out):  # another process's run (flock: a second open file is refused, even here)
        code, text = cotune(capsys, "run", "--resume", out)
        assert code == 2 and f"is in use by another cotune process (pid {os.getpid()}" in text
        fresh = tmp_path / "fresh"
        with run_lock(fresh):
            code, text = cotune(capsys, "run", cfg, "--out", fresh)
            assert code == 2 and "in use by another cotune process" in text
    assert [r for r, _ in list_checkpoints(out)] == [0]  # untouched
    assert cotune(capsys, "run", "--resume", out)[0] == 0  # free again


def test_a_temporary_checkpoint_is_removed_only_when_its_writer_is_gone(tmp_path):
    root = tmp_path / "checkpoints"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = root / f".tmp-round-0001-{sleeper.pid}"
        dead = root / ".tmp-round-0001-999999999"
        for d in (live, dead):
            d.mkdir(parents=True)
        write_checkpoint(tmp_path, 1, lambda d: (d / "state.pt").write_bytes(b"x"))
        assert live.is_dir() and not dead.exists() and (root / "round-0001").is_dir()
    finally:
        sleeper.kill()


# ---- resume rules and dead ends --------------------------------------------------------------------
def test_resume_refuses_overrides_that_change_the_experiment_and_applies_runtime_ones(
    capsys, corpus_dir, tmp_path
):
    out = tmp_path / "run"
    cfg = config(tmp_path, corpus_dir)
    assert cotune(capsys, "run", cfg, "--out", out)[0] == 0
    shutil.rmtree(out / "checkpoints" / "round-0002")
    code, text = cotune(capsys, "run", "--resume", out, "train.lr=0.5", "federation.rounds=3")
    assert code == 2 and "federation.rounds, train.lr would change it" in text
    code, text = cotune(capsys, "run", "--resume", out, "--out", tmp_path / "elsewhere")
    assert code == 2 and "--out does not go with it" in text
    code, text = cotune(capsys, "run", cfg, "--resume", out)  # another file than the run's own config
    assert code == 2 and "with its own config.yaml" in text
    code, text = cotune(capsys, "run", "--resume", out, "run.threads=1")
    assert code == 0, text
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["threads"] == 1
    assert load_run(out).final_round() == 2


def test_a_run_written_by_an_older_cotune_resumes_where_it_stopped(capsys, corpus_dir, tmp_path, monkeypatch):
    """An older version knew no lora.ranks: its config.yaml lacks it and its checkpoints' fingerprint is over
    the settings it knew. A newer version (where the added setting defaults to the old behaviour) resumes
    it, and the run ends exactly as an uninterrupted one; an edited setting is still refused."""
    from cotune.runtime import rundir

    cfg = config(tmp_path, corpus_dir)
    assert cotune(capsys, "run", cfg, "--out", tmp_path / "whole")[0] == 0
    known = rundir.flat_settings

    def older(c):
        return {k: v for k, v in known(c).items() if not k.startswith(("lora.ranks", "lora.tiers"))}

    out = tmp_path / "old"
    with monkeypatch.context() as m:
        m.setattr(rundir, "flat_settings", older)
        assert cotune(capsys, "run", cfg, "--out", out)[0] == 0
    written = yaml.safe_load((out / "config.yaml").read_text())
    del written["lora"]["ranks"], written["lora"]["tiers"]
    (out / "config.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
    shutil.rmtree(out / "checkpoints" / "round-0002")  # it stopped in its last round

    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    (edited / "config.yaml").write_text((out / "config.yaml").read_text().replace("lr: 0.01", "lr: 0.02"))
    code, text = cotune(capsys, "run", "--resume", edited)
    assert code == 2 and "written by a different config" in text

    code, text = cotune(capsys, "run", "--resume", out, "run.threads=1")
    assert code == 0, text
    assert "ranks" not in yaml.safe_load((out / "config.yaml").read_text())["lora"]  # kept as written
    assert load_run(out).final_round() == 2
    whole, resumed = adapters(tmp_path / "whole"), adapters(out)
    assert all(torch.equal(whole[c][k], resumed[c][k]) for c in whole for k in whole[c])


def test_an_added_setting_away_from_its_default_is_not_the_older_run(corpus_dir, tmp_path):
    from cotune.config import config_from_dict
    from cotune.runtime.rundir import config_fingerprint, written_fingerprint

    cfg = config_from_dict(tiny_tree(corpus_dir, tmp_path))
    written = cfg.family_dump()
    assert written_fingerprint(cfg, written) == config_fingerprint(cfg)
    del written["lora"]["ranks"]
    assert written_fingerprint(cfg, written) is not None  # added since, at its default
    ranked = config_from_dict(tiny_tree(corpus_dir, tmp_path, lora={"ranks": [2, 2, 2, 2]}))
    assert written_fingerprint(ranked, written) is None  # added since, and set


def test_a_run_killed_before_its_first_checkpoint_can_be_started_over(capsys, corpus_dir, tmp_path):
    out = tmp_path / "run"
    cfg = config(tmp_path, corpus_dir, federation={"rounds": 1})
    assert cotune(capsys, "run", cfg, "--out", out)[0] == 0
    shutil.rmtree(out / "checkpoints")  # as if killed while loading, before round 0 was checkpointed
    code, text = cotune(capsys, "run", cfg, "--out", out)
    assert code == 2 and f"it has no completed round: `cotune run --resume {out}` starts it over" in text
    code, text = cotune(capsys, "run", "--resume", out)
    assert code == 0 and "no completed round yet, starting it over" in text
    assert [r for r, _ in list_checkpoints(out)] == [0, 1]
    starts = [ln for ln in (out / "metrics.jsonl").read_text().splitlines() if '"event":"start"' in ln]
    assert len(starts) == 1  # the abandoned attempt's records are gone


@pytest.mark.slow
def test_resume_finishes_every_compare_sibling(capsys, corpus_dir, tmp_path):
    out = tmp_path / "run"
    cfg = config(tmp_path, corpus_dir, run={"compare": ["local", "weight"]})
    assert cotune(capsys, "run", cfg, "--out", out)[0] == 0
    shutil.rmtree(tmp_path / "run.local" / "checkpoints" / "round-0002")  # died in its last round
    shutil.rmtree(tmp_path / "run.weight")  # never started
    code, text = cotune(capsys, "run", "--resume", out)
    assert code == 0, text
    assert f"{out}: already complete" in text and "run.weight: no completed round yet" in text
    for d in (out, tmp_path / "run.local", tmp_path / "run.weight"):
        assert load_run(d).final_round() == 2 and load_run(d).ended


@pytest.mark.slow
def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(capsys, corpus_dir, tmp_path):
    cfg = config(tmp_path, corpus_dir)
    whole, out = tmp_path / "whole", tmp_path / "run"
    for d in (whole, out):
        assert cotune(capsys, "run", cfg, "--out", d)[0] == 0
    (out / "metrics.jsonl").write_text(
        "".join(ln + "\n" for ln in (out / "metrics.jsonl").read_text().splitlines() if '"end"' not in ln)
    )
    state = out / "checkpoints" / "round-0002" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    code, text = cotune(capsys, "run", "--resume", out)
    assert code == 0, text
    assert "warning: skipped damaged checkpoint(s) round-0002 (" in text and "after round 1" in text
    ours, theirs = adapters(whole), adapters(out)
    assert all(torch.equal(ours[c][k], theirs[c][k]) for c in ours for k in ours[c])


# ---- errors: one paragraph, no traceback, no locals, no user data ----------------------------------
@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"fine text\n" + SECRET.encode() + b"\x00\x01\x02", ":2: binary data (a NUL byte), not text"),
        (b"fine text\n\n" + SECRET.encode() + b" \xff\xfe", ":3: not valid UTF-8 text"),
        (
            ('{"text": "ok"}\n{"text": ["' + SECRET + '"]}\n').encode(),
            ":2: 'text' must be a string, not list",
        ),
    ],
    ids=["binary", "undecodable", "text-not-a-string"],
)
def test_text_that_is_not_text_is_refused_with_file_and_line(capsys, corpus_dir, tmp_path, content, fragment):
    suffix = ".jsonl" if content.startswith(b"{") else ".txt"
    data = tmp_path / f"private{suffix}"
    data.write_bytes(content)
    code, text = cotune(
        capsys, "run", config(tmp_path, corpus_dir), f"data.path={data}", "--out", tmp_path / "r"
    )
    assert code == 2 and text.startswith("error:") and f"{data}{fragment}" in text, text  # before the model
    assert SECRET not in text and "Traceback" not in text
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.betas=[2,2]", "train.betas [2.0, 2.0]: each must be in [0, 1)"),
        ("train.lr=.inf", "'train.lr': Input should be a finite number"),
        ("privacy.noise_multiplier=.nan", "'privacy.noise_multiplier': Input should be a finite number"),
        ("run.name=../../escaped", "'run.name': String should match pattern"),
        (
            "strategy.selection=topk strategy.topk=9",
            "strategy.topk 9 > federation.clients 4: it would select every",
        ),
        ("data.seq_len=100000", "windows of 100000 tokens"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_any_work(
    capsys, corpus_dir, tmp_path, override, fragment
):
    code, text = cotune(capsys, "run", config(tmp_path, corpus_dir), *override.split())
    assert code == 2 and fragment in text
    runs = tmp_path / "runs"
    assert not (runs.exists() and any(runs.iterdir())) and not (tmp_path.parent / "escaped").exists()


def test_an_out_that_is_a_file_is_refused(capsys, corpus_dir, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    code, text = cotune(capsys, "run", config(tmp_path, corpus_dir), "--out", taken)
    assert code == 2 and "is a file, not a run directory" in text and taken.read_text() == "mine"


def test_a_bug_shows_where_but_no_message_locals_or_data(capsys, corpus_dir, tmp_path, monkeypatch):
    import cotune.runtime.embedded as embedded

    def broken(*args, **kwargs):
        private_line = SECRET  # a local variable holding user text
        raise KeyError(private_line)

    monkeypatch.setattr(embedded, "run_embedded", broken)
    code, text = cotune(capsys, "run", config(tmp_path, corpus_dir), "--out", tmp_path / "r")
    assert code == 1 and "internal error KeyError at" in text and "rerun with --debug" in text
    assert SECRET not in text and "private_line" not in text and "Traceback" not in text
    code, text = cotune(capsys, "--debug", "run", config(tmp_path, corpus_dir), "--out", tmp_path / "r2")
    assert code == 1 and "Traceback" in text and "raise KeyError(private_line)" in text  # code, no locals
    assert "'private_line':" not in text


def test_ctrl_c_says_the_run_can_be_resumed(capsys, corpus_dir, tmp_path, monkeypatch):
    import cotune.runtime.personalized as personalized

    real = personalized.PersonalizedLoop.train

    def interrupted(self, r, *args):
        if r == 2:
            raise KeyboardInterrupt
        return real(self, r, *args)

    monkeypatch.setattr(personalized.PersonalizedLoop, "train", interrupted)
    out = tmp_path / "run"
    code, text = cotune(capsys, "run", config(tmp_path, corpus_dir), "--out", out)
    assert (
        code == 130
        and f"interrupted: every completed round is kept; continue with `cotune run --resume {out}`" in text
    )
    assert "Traceback" not in text
    monkeypatch.setattr(personalized.PersonalizedLoop, "train", real)
    assert cotune(capsys, "run", "--resume", out)[0] == 0


def test_ctrl_c_outside_a_run_says_nothing_of_rounds(capsys, tmp_path, monkeypatch):
    """A command that runs no experiment (here a node worker) answers Ctrl-C with one word, not with
    what of a run is kept."""
    import cotune.runtime.flower.worker as worker

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(worker, "run_worker", interrupted)
    code, text = cotune(capsys, "flower", "worker", "--socket", tmp_path / "w.sock")
    assert code == 130 and text.strip() == "interrupted", text


@pytest.mark.parametrize(
    ("error", "fragment"),
    [
        (
            OSError(28, "No space left on device", "metrics.jsonl"),
            "no space left on the device writing metrics.jsonl",
        ),
        (PermissionError(13, "Permission denied", "/read-only/run"), "permission denied: /read-only/run"),
        (
            RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "out of memory: lower train.batch_size",
        ),
    ],
    ids=["disk-full", "read-only", "out-of-memory"],
)
def test_resource_problems_are_one_error_paragraph(
    capsys, corpus_dir, tmp_path, monkeypatch, error, fragment
):
    import cotune.runtime.embedded as embedded

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(embedded, "run_embedded", fails)
    code, text = cotune(capsys, "run", config(tmp_path, corpus_dir), "--out", tmp_path / "r")
    assert code == 2 and f"error: {fragment}" in text and "Traceback" not in text
