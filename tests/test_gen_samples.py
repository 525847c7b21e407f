"""Sample generations (P14 item 4): a few test examples with what each model generated are recorded
(`gen_sample`) and shown in the report only when the data is the shipped public data (task.source /
data.sources of a shipped corpus), never for a user's own file; shown escaped and bounded.
Tiny models, one round, short decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tests.test_fedcollm_generation import CANARY as FED_CANARY
from tests.test_fedcollm_generation import gen_file, gen_tree  # noqa: F401  (gen_file: a fixture)
from tests.test_personalized_generation import CANARY as PERS_CANARY
from tests.test_personalized_generation import gen_tree as pers_tree
from tests.test_run_safety import cotune

from cotune.config import config_from_dict
from cotune.records import SAMPLE_PROMPT_CHARS, SAMPLE_TEXT_CHARS, GenSampleRecord
from cotune.reporting.metrics import read_metrics
from cotune.reporting.report import sample_text, write_report

ROOT = Path(__file__).resolve().parent.parent


def records(run_dir: Path, kind: str) -> list[dict]:
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if m["type"] == kind]


def write(tree: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def headlines_fedcollm(tmp_path: Path) -> dict:
    """The shipped FedCoLLM headline example, made smaller: one round, 4 test examples, 6 new tokens."""
    tree = yaml.safe_load((ROOT / "examples" / "fedcollm-headlines-tiny.yaml").read_text())
    tree["device"] = "cpu"
    tree["task"].update(
        {"max_test_examples": 4, "max_new_tokens": 6, "source": {"corpus": "bbc", "max_docs": 8}}
    )
    tree["federation"].update({"rounds": 1, "local_steps": 1})
    tree["run"] = {"seed": 0, "threads": 1}
    return tree


def headlines_personalized(tmp_path: Path) -> dict:
    """The shipped personalized headline task on the tiny model: 4 clients (topics), one round."""
    tree = pers_tree(tmp_path, federation={"rounds": 1})
    del tree["data"]["path"]
    tree["data"]["sources"] = [{"corpus": "bbc", "max_docs": 12}]
    tree["data"]["max_chars"] = 80
    tree["run"].pop("out_dir")
    return tree


# ---- shipped data: recorded and shown -------------------------------------------------------------------
def test_a_shipped_headline_task_records_samples_per_model_and_the_report_shows_them(capsys, tmp_path):
    cfg = write(headlines_fedcollm(tmp_path), tmp_path / "exp.yaml")
    code, out = cotune(capsys, "run", cfg, "--out", tmp_path / "run")
    assert code == 0, out
    run_dir = tmp_path / "run"
    samples = records(run_dir, "gen_sample")
    # the final round only (round 1), 3 per model, the same first test examples for every model
    assert sorted((s["round"], s["model"], s["client"], s["example"]) for s in samples) == [
        (1, m, None, i) for m in ("llm", "slm") for i in range(3)
    ]
    for s in samples:
        assert s["prompt"] and s["reference"] and s["split"] == "test"
        assert len(s["prompt"]) <= SAMPLE_PROMPT_CHARS and len(s["generated"]) <= SAMPLE_TEXT_CHARS
    gens = {(g["round"], g["model"]) for g in records(run_dir, "gen")}
    assert {(s["round"], s["model"]) for s in samples} <= gens
    report = (run_dir / "report.md").read_text()
    assert "## Generation: sample outputs" in report
    for s in samples:
        assert sample_text(s["reference"], SAMPLE_TEXT_CHARS) in report


def test_a_shipped_personalized_headline_task_records_each_clients_samples(capsys, tmp_path):
    cfg = write(headlines_personalized(tmp_path), tmp_path / "exp.yaml")
    code, out = cotune(capsys, "run", cfg, "--out", tmp_path / "run")
    assert code == 0, out
    run_dir = tmp_path / "run"
    samples = records(run_dir, "gen_sample")
    final = {g["client"]: g["n"] for g in records(run_dir, "gen") if g["round"] == 1}
    # each client's first test examples (at most 3), at the final round only
    assert len(final) == 4 and sorted((s["round"], s["client"], s["example"]) for s in samples) == [
        (1, c, i) for c, n in sorted(final.items()) for i in range(min(n, 3))
    ]
    assert all(s["model"] is None and s["reference"] for s in samples)
    assert "## Generation: sample outputs" in (run_dir / "report.md").read_text()


# ---- a user's own data: never ----------------------------------------------------------------------------
def test_a_task_of_the_users_own_file_records_and_shows_no_sample(capsys, tmp_path, gen_file):  # noqa: F811
    tree = gen_tree(gen_file, tmp_path)
    tree["federation"]["rounds"] = 1
    tree["run"].pop("out_dir")
    code, out = cotune(capsys, "run", write(tree, tmp_path / "exp.yaml"), "--out", tmp_path / "run")
    assert code == 0, out
    run_dir = tmp_path / "run"
    assert records(run_dir, "gen") and not records(run_dir, "gen_sample")
    report = (run_dir / "report.md").read_text()
    assert "sample outputs" not in report
    for text in ((run_dir / "metrics.jsonl").read_text(), report, out):
        assert FED_CANARY not in text


@pytest.mark.parametrize("own", ["path", "clients"])
def test_personalized_data_of_the_users_own_files_records_no_sample(capsys, tmp_path, own):
    tree = pers_tree(tmp_path, federation={"rounds": 1})
    tree["run"].pop("out_dir")
    if own == "clients":  # one file per owner
        path = tree["data"].pop("path")
        tree["data"]["clients"] = [path] * tree["federation"]["clients"]
    code, out = cotune(capsys, "run", write(tree, tmp_path / "exp.yaml"), "--out", tmp_path / "run")
    assert code == 0, out
    run_dir = tmp_path / "run"
    assert records(run_dir, "gen") and not records(run_dir, "gen_sample")
    report = (run_dir / "report.md").read_text()
    for text in ((run_dir / "metrics.jsonl").read_text(), report, out):
        assert PERS_CANARY not in text and PERS_CANARY[::-1] not in text


def test_the_rule_what_counts_as_shipped_public_data(tmp_path):
    fed = headlines_fedcollm(tmp_path)
    assert config_from_dict(fed).task.shows_samples
    pers = headlines_personalized(tmp_path)
    assert config_from_dict(pers).data.shows_samples
    own = pers_tree(tmp_path)  # data.path: a user's file
    assert not config_from_dict(own).data.shows_samples


def test_a_flower_node_with_its_own_data_path_sends_no_sample(tmp_path):
    """A node that brings its own data has data.path set in its config (`node_config`): its decoding
    sends no sample, whatever the server's config says."""
    from cotune.models.tiny import build_tiny_model, byte_tokenizer
    from cotune.runtime.flower.node import NodeSettings, node_config
    from cotune.runtime.setup import decoding_of

    shipped = headlines_personalized(tmp_path)
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    tok = byte_tokenizer()
    model = build_tiny_model(config_from_dict(shipped).model.tiny, len(tok))
    demo = node_config(yaml.safe_dump(shipped), NodeSettings(partition=0))
    owner = node_config(yaml.safe_dump(shipped), NodeSettings(partition=0, data_path=str(own)))
    assert decoding_of(demo, model, tok).samples == 3  # type: ignore[union-attr]
    assert decoding_of(owner, model, tok).samples == 0  # type: ignore[union-attr]


# ---- shown safely -----------------------------------------------------------------------------------------
def test_the_report_escapes_and_bounds_sample_text(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"algorithm": "fedcollm"}))
    evil = "\x1b[2J![x](http://e/x.png) <b>|bold|</b>\nnext line " + "y" * 1000
    lines = [
        {"type": "run", "event": "start", "algorithm": "fedcollm"},
        {
            "type": "gen",
            "round": 1,
            "model": "slm",
            "client": None,
            "n": 1,
            "exact_match": 0.0,
            "f1": 0.0,
            "rouge_l": 0.0,
            "ppl": 2.0,
        },
        GenSampleRecord(round=1, model="slm", example=0, prompt=evil, reference="r", generated=evil).line(),
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = write_report([run_dir]).read_text()
    (row,) = [line for line in report.splitlines() if line.startswith("| fedcollm | SLM | global | 1 | 0 |")]
    assert "\x1b" not in report and "\\x1b" in row
    assert "![x]" not in row and "<b>" not in row and "\\<b\\>" in row and "\\|bold\\|" in row
    assert "\n" not in row and "↵" in row
    assert "y" * (SAMPLE_PROMPT_CHARS + 1) not in row and "y" * (SAMPLE_TEXT_CHARS - 50) in row


def test_samples_cross_the_flower_codec_as_they_were_sent():
    """A Flower node of shipped data sends its samples inside its EvalReport (the one codec)."""
    from cotune.evaluation.generation import GenSample
    from cotune.evaluation.lm import LMEval
    from cotune.runtime.flower.protocol import decode, encode
    from cotune.runtime.port import EvalReport, GenScores

    sample = GenSample(0, "prompt ↵ \x1b", "reference", "generated")
    report = EvalReport(LMEval(1.0, 2.7, 0.5, 8), gen=GenScores(1, 0.0, 0.5, 0.25, 3.0, (sample,)))
    assert decode(encode(report), EvalReport) == report
    bare = EvalReport(LMEval(1.0, 2.7, 0.5, 8), gen=GenScores(1, 0.0, 0.5, 0.25, 3.0))
    assert decode(encode(bare), EvalReport).gen.samples == ()  # type: ignore[union-attr]


def test_shipped_personalized_samples_on_flower_are_the_embedded_ones(tmp_path):
    """SuperNodes of the config's shipped data (no data-path of their own) send their samples in their
    EvalReport: the same gen_sample records as embedded, through the real ClientApp in process."""
    from tests.test_flower import InProcessGrid

    from cotune.runtime.experiment import run_experiment
    from cotune.runtime.flower.clients import ServerSettings
    from cotune.runtime.flower.server_app import prepare_run_dir, run_server

    cfg = config_from_dict(headlines_personalized(tmp_path))
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    flower = tmp_path / "flower"
    prepare_run_dir(flower, cfg)
    grid = InProcessGrid(cfg.federation.clients)
    assert run_server(cfg, flower, grid, ServerSettings.from_config(cfg), say=lambda s: None) == "completed"
    ours, theirs = records(embedded, "gen_sample"), records(flower, "gen_sample")
    assert ours and ours == theirs
