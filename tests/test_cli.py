"""The commands of the README and docs/outputs.md (run, resume, report), end to end, through the real CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from tests.conftest import tiny_tree
from typer.testing import CliRunner

from cotune.cli.main import app
from cotune.reporting.metrics import load_run

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.mark.slow
def test_tiny_personalized_example_end_to_end(tmp_path):
    out = tmp_path / "tiny"
    result = runner.invoke(app, ["run", str(ROOT / "examples/tiny-personalized.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    run = load_run(out)
    baseline = load_run(out.with_name("tiny.local"))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert run.final_round() == baseline.final_round() == cfg["federation"]["rounds"]
    assert len(run.final_ppl()) == cfg["federation"]["clients"]
    # training helped every client relative to the untrained model (round 0)
    assert all(run.final_ppl()[c] < run.ppl_by_round[0][c] for c in run.final_ppl())
    assert (out / "report.md").is_file() and (out / "plots" / "ppl_per_round.png").is_file()
    assert "mean ± std" in result.output


@pytest.mark.slow
def test_cli_resume_continues_a_run(corpus_dir, tmp_path):
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_tree(corpus_dir, tmp_path)))
    out = tmp_path / "run"
    assert runner.invoke(app, ["run", str(cfg_path), "--out", str(out)]).exit_code == 0
    shutil.rmtree(out / "checkpoints" / "round-0002")
    result = runner.invoke(app, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "checkpoints" / "round-0002").is_dir()
    assert load_run(out).final_round() == 2


@pytest.mark.slow
def test_cli_report_compares_runs(corpus_dir, tmp_path):
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_tree(corpus_dir, tmp_path, run={"compare": ["local"]})))
    out = tmp_path / "r"
    assert runner.invoke(app, ["run", str(cfg_path), "--out", str(out)]).exit_code == 0
    result = runner.invoke(
        app, ["report", str(out), str(tmp_path / "r.local"), "--out", str(tmp_path / "rep")]
    )
    assert result.exit_code == 0, result.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "fedavg" in text and "local" in text


def test_run_into_a_non_empty_directory_is_refused(corpus_dir, tmp_path):
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_tree(corpus_dir, tmp_path)))
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something").write_text("x")
    result = runner.invoke(app, ["run", str(cfg_path), "--out", str(out)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "is not empty; it is not a cotune run directory, so cotune will not write into it" in text
    assert (out / "something").read_text() == "x"


@pytest.mark.slow
def test_fedcollm_tiny_example_runs_every_algorithm(tmp_path):
    out = tmp_path / "fc"
    every = "run.compare=[zero_shot,standalone,fedavg,centralized]"
    result = runner.invoke(app, ["run", str(ROOT / "examples/fedcollm-tiny.yaml"), every, "--out", str(out)])
    assert result.exit_code == 0, result.output
    runs = {d.name: load_run(d) for d in tmp_path.iterdir()}
    assert set(runs) == {"fc", "fc.zero_shot", "fc.standalone", "fc.fedavg", "fc.centralized"}
    assert runs["fc"].algorithm == "fedcollm" and runs["fc"].final_mc("llm") is not None
    assert runs["fc.centralized"].final_mc("llm") is not None
    assert runs["fc.standalone"].final_mc("slm")[2] is not None  # a spread over clients
    text = (out / "report.md").read_text()
    for row in (
        "SLM zero-shot",
        "SLM standalone",
        "SLM FedAvg",
        "SLM FedCoLLM",
        "LLM centralized",
        "LLM FedCoLLM",
    ):
        assert row in text
    assert (out / "plots" / "accuracy_per_round.png").is_file()
