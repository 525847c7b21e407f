"""FedCoLLM with an LLM of another tokenizer than the SLM's (tiny models: one token per byte against a
tokenizer with merges), embedded: mutual distillation across the tokenizers, its coverage records, and
each model evaluated with its own tokenizer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from tests.test_cotuning import records, task_file, tree  # noqa: F401  (task_file is a fixture)
from typer.testing import CliRunner

from cotune.cli.main import app
from cotune.config import config_from_dict
from cotune.data.generation import GenExample
from cotune.data.task_data import build_task_data, with_llm_encoding
from cotune.models.tiny import byte_tokenizer, merged_tokenizer
from cotune.models.vocab_map import build_bridge
from cotune.reporting.metrics import load_run
from cotune.reporting.report import align_rows, write_report
from cotune.runtime.experiment import run_experiment
from cotune.runtime.fedcollm import Scorer, Server

MERGES_LLM = {"tokenizer": "merges"}


def cross_tree(task_file, tmp_path, **extra):  # noqa: F811
    t = tree(task_file, tmp_path, **extra)
    t["llm"]["model"]["tiny"] = {**t["llm"]["model"]["tiny"], **MERGES_LLM}
    return t


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The vocabulary map is cached under $COTUNE_CACHE: this test's own folder."""
    monkeypatch.setenv("COTUNE_CACHE", str(tmp_path / "cache"))


def test_the_llm_encoding_holds_the_same_examples_row_for_row(task_file, tmp_path):  # noqa: F811
    cfg = config_from_dict(cross_tree(task_file, tmp_path))
    assert cfg.task is not None
    slm, llm = byte_tokenizer(), merged_tokenizer()
    task = build_task_data(cfg.task, 3, slm, 0, 0.2)
    with_llm_encoding(cfg.task, task, llm)
    assert task.llm_public is not None and task.llm_union is not None
    assert len(task.llm_public) == len(task.public) and len(task.llm_union) == len(task.union)
    rows = torch.tensor([3, 0, 5])
    a, b = task.public.batch(rows, torch.device("cpu")), task.llm_public.batch(rows, torch.device("cpu"))
    assert a["rows"].tolist() == [3, 0, 5]
    for i in range(3):  # the same answer text under both tokenizers
        sa = a["labels"][i][a["labels"][i] >= 0][:-1]  # less the EOS
        sb = b["labels"][i][b["labels"][i] >= 0][:-1]
        assert slm.decode(sa) == llm.decode(sb)
        assert len(sb) <= len(sa)


@pytest.mark.slow
def test_fedcollm_runs_across_tokenizers_with_coverage_records(task_file, tmp_path):  # noqa: F811
    cfg = config_from_dict(cross_tree(task_file, tmp_path, distill={"topk": 8}))
    (run_dir,) = run_experiment(cfg)
    align = records(run_dir, "align")
    assert sorted((a["round"], a["model"]) for a in align) == [(1, "llm"), (1, "slm"), (2, "llm"), (2, "slm")]
    for a in align:
        assert a["positions"] > 0 and 0.0 < a["exact_share"] <= 1.0
        assert 0.0 < a["carried_share"] <= 1.0 + 1e-6
        assert a["carried_share"] + a["unmatched_share"] == pytest.approx(1.0, abs=1e-5)
    by_model = {a["model"]: a for a in align if a["round"] == 1}
    assert by_model["slm"]["vocab_matched"] < 1.0  # the LLM's merged tokens have no match in bytes
    assert by_model["llm"]["vocab_matched"] == 1.0  # every byte is a token of the LLM
    distill = records(run_dir, "distill")
    assert len(distill) == 2
    for d in distill:
        assert all(math.isfinite(d[k]) for k in ("slm_ce", "slm_kd", "llm_ce", "llm_kd"))
        assert d["slm_kd"] > 0.0 and d["llm_kd"] > 0.0
    mc = records(run_dir, "mc")
    assert {(m["round"], m["model"]) for m in mc} == {(r, m) for r in (0, 1, 2) for m in ("slm", "llm")}
    run = load_run(run_dir)
    assert [(a.round, a.model) for a in run.align] == [(1, "llm"), (1, "slm"), (2, "llm"), (2, "slm")]
    header, rows = align_rows([run])
    assert len(rows) == 4 and header[4] == "exact" and rows[0][2] == "LLM"
    report = write_report([run_dir], tmp_path / "report").read_text()
    assert "## Co-tuning across tokenizers" in report


@pytest.mark.slow
def test_centralized_llm_trains_on_its_own_encoding(task_file, tmp_path):  # noqa: F811
    cfg = config_from_dict(cross_tree(task_file, tmp_path, algorithm="centralized"))
    (run_dir,) = run_experiment(cfg)
    train = [t for t in records(run_dir, "train") if t["model"] == "llm"]
    assert train and all(math.isfinite(t["loss"]) for t in train)
    assert not records(run_dir, "align")


@pytest.mark.slow
def test_a_generation_task_across_tokenizers(tmp_path):
    """Headlines: the LLM of another tokenizer is distilled, validated and decodes with its own tokenizer."""
    path = Path(__file__).resolve().parents[1] / "examples" / "fedcollm-headlines-tiny.yaml"
    tree_ = yaml.safe_load(path.read_text())
    tree_["llm"]["model"]["tiny"]["tokenizer"] = "merges"
    tree_["device"] = "cpu"
    tree_["task"]["max_test_examples"] = 4
    tree_["federation"] = {"clients": 2, "rounds": 1, "local_steps": 1}
    tree_["distill"]["max_steps"] = 2
    tree_["run"] = {"seed": 0, "out_dir": str(tmp_path / "runs"), "name": "g"}
    (run_dir,) = run_experiment(config_from_dict(tree_))
    align = records(run_dir, "align")
    assert {a["model"] for a in align} == {"slm", "llm"}
    assert all(a["positions"] > 0 and a["exact_share"] > 0 for a in align)
    gen = [g for g in records(run_dir, "gen") if g["split"] == "test"]
    assert {(g["round"], g["model"]) for g in gen} == {(r, m) for r in (0, 1) for m in ("slm", "llm")}
    val = records(run_dir, "distill_val")
    assert {v["model"] for v in val} == {"slm", "llm"} and all(math.isfinite(v["nll"]) for v in val)


def test_each_model_is_evaluated_with_its_own_tokenizer(tmp_path):
    """The server's scorer encodes the LLM's requests (and multiple-choice examples) with the LLM's
    tokenizer when it has another, the SLM's with the SLM's; with one tokenizer, both with it."""
    slm, llm = byte_tokenizer(), merged_tokenizer()
    bridge = build_bridge(slm, llm, cache_dir=tmp_path)
    cfg = config_from_dict(cross_tree(Path(__file__), tmp_path, task={"kind": "generation"}))
    examples = [GenExample(prompt="the cat and the dog", response="they sing")]

    def scorer(bridge_):
        server = Server(None, None, None, None, slm, 0, 0, bridge_)  # type: ignore[arg-type]
        return server, Scorer(cfg, server)

    server, s = scorer(bridge)
    assert server.tokenizer_of("llm") is llm and server.tokenizer_of("slm") is slm
    as_llm = s.requests(examples, to_decode=False, role="llm")[0]
    as_slm = s.requests(examples, to_decode=False, role="slm")[0]
    assert llm.decode(as_llm.prompt_ids) == slm.decode(as_slm.prompt_ids)
    assert len(as_llm.prompt_ids) < len(as_slm.prompt_ids)  # merged pairs: fewer tokens
    server, s = scorer(None)
    assert server.tokenizer_of("llm") is slm
    assert s.requests(examples, to_decode=False, role="llm")[0].prompt_ids == as_slm.prompt_ids


@pytest.mark.slow
def test_cli_runs_a_pair_of_tokenizers_and_says_what_the_map_covers(task_file, tmp_path):  # noqa: F811
    """`cotune run` with an LLM of another tokenizer: exit 0 (it was refused before), the map's coverage
    on the console, align records in the run's metrics."""
    t = cross_tree(task_file, tmp_path, federation={"clients": 3, "rounds": 1, "local_steps": 1})
    path = tmp_path / "cross.yaml"
    path.write_text(yaml.safe_dump(t))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "tokenizers differ" in text and "of the SLM's tokens" in text and "error" not in text
    assert records(tmp_path / "out", "align")
