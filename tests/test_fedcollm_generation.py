"""The FedCoLLM family on generation data (P14): every algorithm end to end, distillation on the response
tokens only, validation by response loss, resume during a generation evaluation, Flower in process bit
for bit, and `cotune eval` on a user's generation file. Tiny models, a few steps, short decoding."""

from __future__ import annotations

import io
import json
import math
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tests.test_cotuning import tree
from tests.test_round_scaffold import check_stopped_and_resumed, stop_in
from tests.test_run_safety import cotune

import cotune.training.distill as distill
from cotune.config import config_from_dict
from cotune.config.schema import DistillConfig, TinyModelConfig
from cotune.data.generation import GenExample, gen_requests
from cotune.data.task_data import encode_generation
from cotune.models.tiny import build_tiny_model, byte_tokenizer
from cotune.records import DistillValRecord
from cotune.reporting.metrics import RunSummary, read_metrics
from cotune.reporting.report import distill_val_rows, write_report
from cotune.runtime import fedcollm
from cotune.runtime.experiment import run_experiment
from cotune.runtime.fedcollm import ValScore

CANARY = "zqx-canary-4471"  # in every prompt and response, and in every generated text (planted below)
MAX_TEST = 5
WORDS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def gen_file(tmp_path_factory) -> Path:
    """60 prompt/response pairs labelled by colour; every prompt and response carries the canary."""
    rng = random.Random(0)
    rows = []
    for i in range(60):
        word = WORDS[i % 3]
        noise = " ".join(rng.choice("abcd") for _ in range(4))
        rows.append(
            {"prompt": f"{noise} {CANARY} colour {word}", "response": f"{word} {CANARY}", "label": word}
        )
    path = tmp_path_factory.mktemp("gen") / "gen.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def gen_tree(path: Path, tmp_path: Path, algorithm: str = "fedcollm", **extra) -> dict:
    task_extra = extra.pop("task", {})
    t = tree(path, tmp_path, algorithm, **{**extra, "run": {"threads": 1, **extra.get("run", {})}})
    task = {"kind": "generation", "path": str(path), "test_fraction": 0.2, "max_length": 64}
    t["task"] = {**task, "max_new_tokens": 4, "max_test_examples": MAX_TEST, **task_extra}
    return t


def records(run_dir: Path, kind: str) -> list[dict]:
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if m["type"] == kind]


@pytest.fixture
def canary_generations(monkeypatch) -> list[int]:
    """Every generated text is the canary (as a model that learnt a client's data might write it); the
    returned list counts the decoding runs."""
    real, calls = fedcollm.evaluate_generation, []

    def planted(*args, **kwargs):
        calls.append(1)
        res = real(*args, **kwargs)
        return replace(res, predictions=[f"{CANARY} text"] * res.n)

    monkeypatch.setattr(fedcollm, "evaluate_generation", planted)
    return calls


# ---- every algorithm ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_algorithm_generates_scores_and_never_logs_the_text(gen_file, tmp_path, canary_generations):
    t = gen_tree(gen_file, tmp_path, run={"compare": ["zero_shot", "standalone", "fedavg", "centralized"]})
    shown = io.StringIO()
    dirs = run_experiment(config_from_dict(t), tmp_path / "run", Console(file=shown, width=200))
    by_algorithm = {
        json.loads((d / "metrics.jsonl").read_text().splitlines()[0])["algorithm"]: d for d in dirs
    }
    assert set(by_algorithm) == {"fedcollm", "zero_shot", "standalone", "fedavg", "centralized"}
    expected = {  # (round, model, client) of every GenRecord
        "fedcollm": {(r, m, None) for r in (0, 1, 2) for m in ("slm", "llm")},
        "zero_shot": {(0, "slm", None), (0, "llm", None)},
        "standalone": {(0, "slm", None)} | {(r, "slm", k) for r in (1, 2) for k in range(3)},
        "fedavg": {(r, "slm", None) for r in (0, 1, 2)},
        "centralized": {(0, "slm", None), (0, "llm", None), (1, "llm", None), (2, "llm", None)},
    }
    for algorithm, run_dir in by_algorithm.items():
        gens = records(run_dir, "gen")
        assert {(g["round"], g["model"], g["client"]) for g in gens} == expected[algorithm], algorithm
        assert len(gens) == len(expected[algorithm]) and not records(run_dir, "mc")
        for g in gens:
            assert g["n"] == MAX_TEST and g["split"] == "test"
            assert all(0.0 <= g[k] <= 1.0 for k in ("exact_match", "f1", "rouge_l"))
            assert math.isfinite(g["ppl"]) and g["ppl"] > 1.0
        assert CANARY not in (run_dir / "metrics.jsonl").read_text()
    # the server's validation during distillation: response loss, no accuracy
    vals = records(by_algorithm["fedcollm"], "distill_val")
    assert vals and all(v["acc"] is None and math.isfinite(v["nll"]) and v["n"] > 0 for v in vals)
    # zero-shot scores are shared across the variants: decoded once per adapter, not once per variant
    assert len(canary_generations) < sum(len(records(d, "gen")) for d in dirs)
    zero = {d: [g for g in records(d, "gen") if g["round"] == 0 and g["model"] == "slm"] for d in dirs}
    assert len({json.dumps(v[0], sort_keys=True) for v in zero.values()}) == 1
    console = shown.getvalue()
    assert "SLM ROUGE-L" in console and "LLM ROUGE-L" in console and CANARY not in console
    report = write_report(dirs, tmp_path / "report").read_text()
    assert CANARY not in report and "response token" in report


# ---- distillation on the response tokens -------------------------------------------------------------
def test_the_distillation_kl_covers_exactly_the_response_positions(monkeypatch):
    """The KD term of a student step on a generation batch is averaged over the positions that predict a
    response token (or its stop token) and no other: every prompt and padding position is left out."""
    tok = byte_tokenizer()
    examples = [GenExample("short prompt", "yes"), GenExample("a much longer prompt here", "no way")]
    data = encode_generation(tok, examples, 64)
    batch = data.batch(torch.arange(2), torch.device("cpu"))
    expected = torch.zeros(batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1, dtype=torch.bool)
    for row, req in enumerate(gen_requests(tok, examples, 64)):
        n_prompt = len(req.prompt_ids)
        expected[row, n_prompt - 1 : n_prompt - 1 + len(req.response_ids)] = True  # predicts the response
    seen = {}
    real = distill.kd_kl

    def recording(student, teacher, mask, temperature=1.0, topk=None):
        seen.update(student=student.detach(), teacher=teacher.detach(), mask=mask.clone())
        return real(student, teacher, mask, temperature=temperature, topk=topk)

    monkeypatch.setattr(distill, "kd_kl", recording)
    small = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=1)
    student, teacher = (
        build_tiny_model(small, len(tok)),
        build_tiny_model(small.model_copy(update={"seed": 2}), len(tok)),
    )
    vocab = len(tok)
    signal = distill.teacher_signal(teacher, batch, vocab, None)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    _, kd = distill.student_step(student, signal, batch, opt, sched, DistillConfig(), vocab, None)
    assert torch.equal(seen["mask"], expected)
    assert int(expected.sum()) == sum(len(r.response_ids) for r in gen_requests(tok, examples, 64))
    # by hand: KL(p_teacher || p_student) at the response positions, averaged over them
    log_t = torch.log_softmax(seen["teacher"].float(), -1)[expected]
    log_s = torch.log_softmax(seen["student"].float(), -1)[expected]
    by_hand = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    assert kd == pytest.approx(float(by_hand), rel=1e-5)


def test_generation_validation_prefers_the_lower_response_loss_and_the_report_shows_it():
    assert ValScore(None, 1.0, 4).better_than(ValScore(None, 1.5, 4))
    assert not ValScore(None, 1.5, 4).better_than(ValScore(None, 1.0, 4))
    assert ValScore(0.75, 0.9, 4).better_than(ValScore(0.5, 0.1, 4))  # multiple choice: accuracy first

    curve = [
        DistillValRecord(round=1, model="slm", step=s, acc=None, nll=nll, n=3)
        for s, nll in enumerate([2.0, 1.25, 1.5])
    ]
    _, rows = distill_val_rows([RunSummary(run_dir=Path("g"), label="g", config={}, distill_val=curve)])
    assert rows == [["g", "1", "SLM", "2.000", "1.500 (step 2)", "1.250 (step 1)", "step 2 (last)"]]


# ---- resume ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_run_stopped_during_a_generation_evaluation_resumes_to_the_same_records(
    gen_file, tmp_path, monkeypatch
):
    def cfg(name):
        return config_from_dict(gen_tree(gen_file, tmp_path, "fedcollm", run={"name": name}))

    (full,) = run_experiment(cfg("full"))
    stop_in(monkeypatch, fedcollm.FedCoLLMLoop, "log_gen", 1, 2)  # the SLM's round-1 record in, the LLM's not
    check_stopped_and_resumed(
        monkeypatch, fedcollm.FedCoLLMLoop, cfg("part"), tmp_path / "runs" / "part.fedcollm", full, 2
    )
    part = tmp_path / "runs" / "part.fedcollm"
    gens = [(g["round"], g["model"], g["client"]) for g in records(part, "gen")]
    assert len(gens) == len(set(gens)) == 6  # each logged once: the SLM's round-1 scores not recomputed


# ---- Flower ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedcollm", "standalone"])
def test_generation_on_flower_gives_the_embedded_results_bit_for_bit(gen_file, tmp_path, algorithm):
    pytest.importorskip("flwr")
    from tests.test_flower import InProcessGrid, _adapters, _records, _run_flower_in_process, max_adapter_diff

    cfg = config_from_dict(gen_tree(gen_file, tmp_path, algorithm))
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    assert _run_flower_in_process(cfg, tmp_path / "flower", InProcessGrid(3)) == "completed"
    flower = tmp_path / "flower"
    ours, theirs = _adapters(embedded, pattern="*"), _adapters(flower, pattern="*")
    assert ("server-llm" in ours) == (algorithm == "fedcollm")
    assert max_adapter_diff(ours, theirs) == 0.0
    for kind, keys in [
        ("gen", ("round", "model", "client", "n", "exact_match", "f1", "rouge_l", "ppl")),
        ("train", ("round", "client", "loss", "lr")),
        ("distill", ("round", "slm_kd", "llm_kd", "slm_kept", "llm_kept")),
        ("distill_val", ("round", "model", "step", "acc", "nll")),
    ]:
        rows = [[{k: r[k] for k in keys} for r in _records(d, kind)] for d in (embedded, flower)]
        assert rows[0] == rows[1], kind
    assert _records(embedded, "gen")


def test_supernodes_with_their_own_generation_files(gen_file, tmp_path):
    pytest.importorskip("flwr")
    from tests.test_flower import InProcessGrid, _records, _run_flower_in_process

    cfg = config_from_dict(gen_tree(gen_file, tmp_path, "fedavg", federation={"rounds": 1}))
    grid = InProcessGrid(3)
    for ctx in grid.contexts.values():
        ctx.node_config["data-path"] = str(gen_file)  # all of it is this node's private set D_k
    assert _run_flower_in_process(cfg, tmp_path / "run", grid) == "completed"
    assert [r["client"] for r in _records(tmp_path / "run", "train")] == [0, 1, 2]
    assert {g["round"] for g in _records(tmp_path / "run", "gen")} == {0, 1}
    assert CANARY not in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_supernodes_with_their_own_generation_files_give_the_task_clients_results(gen_file, tmp_path):
    """Per-owner generation data (task.clients): each SuperNode reads its own JSONL, through its data-path
    or the config's task.clients entry, as embedded task.clients reads that owner's file; adapters and
    records are the embedded run's bit for bit. Neither the ServerApp nor a node reads another owner's
    file: owners 1 and 2 are moved off the config's paths before the Flower run (node 0 reads its file
    there). A node's own-data claim n_k is bounded by federation.max_examples, so FedAvg weighs by it as
    embedded does."""
    pytest.importorskip("flwr")
    from tests.test_flower import InProcessGrid, _adapters, _records, _run_flower_in_process, max_adapter_diff

    lines = gen_file.read_text().splitlines()
    parts = {name: lines[k::5] for k, name in enumerate(("owner0", "owner1", "owner2", "public", "test"))}
    files = {name: tmp_path / f"{name}.jsonl" for name in parts}
    for name, rows in parts.items():
        files[name].write_text("\n".join(rows) + "\n")
    owners = [files[f"owner{i}"] for i in range(3)]
    task = {"clients": [str(o) for o in owners], "public": str(files["public"]), "test": str(files["test"])}
    tree_ = gen_tree(gen_file, tmp_path, "fedcollm", federation={"rounds": 1, "max_examples": 12}, task=task)
    del tree_["task"]["path"], tree_["task"]["test_fraction"]
    cfg = config_from_dict(tree_)
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")

    grid = InProcessGrid(3)
    node_disk = tmp_path / "nodes"
    node_disk.mkdir()
    for ctx in grid.contexts.values():
        k = int(ctx.node_config["partition-id"])
        if k:  # owners 1 and 2: only on their own node's disk
            ctx.node_config["data-path"] = str(shutil.move(owners[k], node_disk / owners[k].name))
    assert _run_flower_in_process(cfg, tmp_path / "flower", grid) == "completed"
    flower = tmp_path / "flower"
    assert max_adapter_diff(_adapters(embedded, pattern="*"), _adapters(flower, pattern="*")) == 0.0
    for kind, keys in [
        ("gen", ("round", "model", "client", "n", "exact_match", "f1", "rouge_l", "ppl")),
        ("train", ("round", "client", "loss", "lr")),
        ("distill", ("round", "slm_kd", "llm_kd", "slm_kept", "llm_kept")),
    ]:
        rows = [[{k: r[k] for k in keys} for r in _records(d, kind)] for d in (embedded, flower)]
        assert rows[0] == rows[1] and rows[0], kind
    assert CANARY not in (flower / "metrics.jsonl").read_text()


# ---- cotune eval -------------------------------------------------------------------------------------
def test_eval_scores_an_adapter_on_a_generation_file_without_printing_text(capsys, gen_file, tmp_path):
    cfg = config_from_dict(gen_tree(gen_file, tmp_path, "fedavg", federation={"rounds": 1}))
    (run_dir,) = run_experiment(cfg, tmp_path / "run")
    capsys.readouterr()
    code, text = cotune(capsys, "eval", run_dir, "--task", gen_file, "--server", "--max-new-tokens", "3")
    assert code == 0, text
    assert CANARY not in text and "n=60" in text
    for name in ("EM", "F1", "ROUGE-L"):
        assert 0.0 <= float(text.split(f" {name} ")[1].split()[0]) <= 1.0
    assert float(text.split(" ppl ")[1].split()[0]) > 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": CANARY, "response": 3}) + "\n")
    code, text = cotune(capsys, "eval", run_dir, "--task", bad, "--server")
    assert code == 2 and "bad.jsonl:1" in text and CANARY not in text


def test_prompts_are_cut_from_the_left_to_leave_room_for_the_decoding_budget():
    from cotune.evaluation.generation import GenRequest, fit_context

    reqs = [GenRequest((1, 2, 3, 4, 5), (6, 7), "r"), GenRequest((1, 2), (3,), "s")]
    assert fit_context(reqs, 6, 3) == [GenRequest((3, 4, 5), (6, 7), "r"), reqs[1]]  # 3 + 3 = 6 positions
    assert fit_context(reqs, None, 3) == reqs and fit_context(reqs, 8, 3) == reqs
    with pytest.raises(ValueError, match="max_new_tokens 6 leaves no room"):
        fit_context(reqs, 6, 6)
