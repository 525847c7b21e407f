"""The personalized family on generation data (P14 items 1-4): data.kind generation, response-only
perplexity, test generations scored per client, trust on response positions, bad files refused first."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from rich.console import Console
from typer.testing import CliRunner

from cotune.algorithms.trust import PredictionDistance
from cotune.cli.main import app
from cotune.config import config_from_dict
from cotune.data.client_examples import client_data
from cotune.evaluation.generation import perplexity, response_nll
from cotune.evaluation.lm import IGNORE_INDEX, evaluate_lm
from cotune.reporting.metrics import read_metrics
from cotune.runtime.experiment import run_experiment
from cotune.runtime.personalized import prediction_distance
from cotune.runtime.setup import adapter_pool, decoding_of, load_model, personalized_works

CANARY = "ZEBRACANARY"  # planted in every prompt and response: must never reach metrics or output
LABELS = ("ants", "bees", "cats", "dogs")
runner = CliRunner()


def write_examples(path: Path, per_label: int = 10, labels: tuple[str, ...] = LABELS) -> Path:
    rows = [
        {"prompt": f"{CANARY} {lab} {i}?", "response": f"{CANARY} {lab[::-1]} {i}", "label": lab}
        for lab in labels
        for i in range(per_label)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gen_tree(tmp_path: Path, **sections: dict) -> dict:
    tree: dict = {
        "model": {
            "name": "tiny",
            "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        },
        "lora": {"r": 2, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {
            "kind": "generation",
            "path": str(write_examples(tmp_path / "examples.jsonl")),
            "seq_len": 48,
            "max_new_tokens": 4,
            "max_val_windows": 2,
            "max_test_windows": 2,
            "public_windows": 4,
        },
        "train": {"lr": 1e-2, "batch_size": 4, "eval_batch_size": 4},
        "federation": {"clients": 4, "rounds": 2, "local_steps": 2, "warmup_steps": 2},
        "strategy": {"name": "validation", "val_batches": 1},
        "run": {"seed": 0, "out_dir": str(tmp_path / "runs"), "name": "g", "threads": 1},
        "device": "cpu",
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    return tree


def records(run_dir: Path, kind: str) -> list[dict]:
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if m["type"] == kind]


# ---- end to end ----------------------------------------------------------------------------------------
def test_local_fedavg_validation_and_prediction_trust_run_on_generation_data(tmp_path):
    cfg = config_from_dict(gen_tree(tmp_path, run={"compare": ["local", "fedavg", "prediction", "oracle"]}))
    dirs = run_experiment(cfg, tmp_path / "runs" / "g")
    assert len(dirs) == 5
    for d in dirs:
        gens = records(d, "gen")
        # every client's test generations, scored on every evaluation round (0: before training, 1, 2)
        assert sorted((g["round"], g["client"]) for g in gens) == [(r, c) for r in range(3) for c in range(4)]
        assert all(g["split"] == "test" and g.get("model") is None and g["n"] == 1 for g in gens)
        assert all(0.0 <= g["rouge_l"] <= 1.0 and g["ppl"] > 1.0 for g in gens)
        evals = records(d, "eval")
        assert {(e["split"], e["round"]) for e in evals} == {
            (s, r) for s in ("val", "test") for r in range(3)
        }
        # the test perplexity is the generation scorer's reference perplexity: the same response tokens,
        # scored once
        for g in gens:
            (e,) = [
                e for e in evals if (e["round"], e["client"], e["split"]) == (g["round"], g["client"], "test")
            ]
            assert e["ppl"] == g["ppl"]
        assert len(records(d, "trust")) == 2
        text = (d / "metrics.jsonl").read_text()
        assert CANARY not in text and CANARY[::-1] not in text  # no prompt, response or generated text
    validation = records(dirs[0], "trust")[-1]["matrix"]
    assert any(0.0 < w < 1.0 for row in validation for w in row)  # the peers' response loss was scored


def test_per_owner_generation_files_and_a_public_file(tmp_path):
    owners = [write_examples(tmp_path / f"owner{i}.jsonl", 6, (lab,)) for i, lab in enumerate(LABELS)]
    public = write_examples(tmp_path / "public.jsonl", 2)
    data = {"clients": [str(p) for p in owners], "public": str(public)}
    tree = gen_tree(tmp_path, strategy={"name": "prediction"}, data=data)
    del tree["data"]["path"]
    cfg = config_from_dict(tree)
    (run_dir,) = run_experiment(cfg, tmp_path / "runs" / "g")
    assert len(records(run_dir, "gen")) == 12
    assert len(records(run_dir, "trust")) == 2


# ---- the numbers ---------------------------------------------------------------------------------------
@pytest.fixture
def works(tmp_path):
    cfg = config_from_dict(gen_tree(tmp_path))
    base, tokenizer, device = load_model(cfg, console=Console(quiet=True))
    data = client_data(cfg.data, cfg.federation.clients, tokenizer, cfg.run.seed)
    pool = adapter_pool(cfg, base)
    return cfg, data, personalized_works(cfg, pool, data, device, decoding_of(cfg, base, tokenizer))


def test_response_perplexity_by_hand(works):
    """evaluate_lm on examples: exp(mean loss over the response tokens only), computed here row by row."""
    _, data, (work, *_) = works
    val = data.clients[0].val
    model = work.pool.model
    got = evaluate_lm(model, val, batch_size=1)
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in range(len(val)):
            length = int(val.attention_mask[row].sum())
            ids, labels = val.input_ids[row, :length], val.labels[row, :length]
            logits = model(input_ids=ids[None]).logits[0, :-1].float()
            scored = labels[1:] != IGNORE_INDEX
            nll += float(F.cross_entropy(logits[scored], labels[1:][scored], reduction="sum"))
            n += int(scored.sum())
    assert got.tokens == n == int((val.labels != IGNORE_INDEX).sum())  # no prompt or padding token counted
    assert got.loss == pytest.approx(nll / n, rel=1e-5)
    assert got.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    # batched with padding: the same figure; and the generation scorer's reference perplexity agrees
    assert evaluate_lm(model, val, batch_size=4).ppl == pytest.approx(got.ppl, rel=1e-5)
    requests = data.clients[0].test_requests
    test = evaluate_lm(model, data.clients[0].test, batch_size=4)
    assert test.ppl == pytest.approx(perplexity(response_nll(model, requests, batch_size=2)), rel=1e-5)


def test_a_client_evaluation_encodes_nothing_and_scores_its_test_responses_once(works, monkeypatch):
    """Each test example is tokenised once, when the data is built: a client's evaluation encodes no text
    (decoding and scoring share the encoded requests), and the references' perplexity of its generation
    scores is its test split's, not a second teacher-forced pass over the same prompts and responses."""
    from transformers import PreTrainedTokenizerBase

    from cotune.evaluation import generation

    cfg, data, (work, *_) = works
    _, tokenizer, _ = load_model(cfg, console=Console(quiet=True))
    calls: list[str] = []

    def counted(owner: type, name: str) -> None:
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    counted(generation, "response_nll")
    for owner in {type(tokenizer), PreTrainedTokenizerBase}:
        for name in ("encode", "__call__", "apply_chat_template"):
            if name in vars(owner):
                counted(owner, name)
    report = work.evaluate()
    assert report.test is not None and report.gen is not None
    assert report.gen.n == len(data.clients[0].test_requests) > 0
    assert report.gen.ppl == report.test.ppl  # one figure, exactly: the same response tokens scored once
    assert calls == []


def test_prediction_trust_compares_the_response_positions_only(works):
    _, data, (a, b, *_) = works
    torch.manual_seed(1)
    for work in (a, b):  # two different adapters
        work.adopt({k: torch.randn_like(v) * 0.5 for k, v in work.adapter().items()})
    public = data.public
    k = 16
    preds = [w.predict(1, len(public), k) for w in (a, b)]
    widest = int((public.labels[:, 1:] != IGNORE_INDEX).sum(1).max())  # the most response tokens of a row
    assert [tuple(p.topk[0][0].shape) for p in preds] == [(len(public), widest, k)] * 2
    assert preds[0].public_hash == preds[1].public_hash  # the same public examples and positions
    got = prediction_distance(preds, k)

    def full_logits(work):  # every position of the padded batch
        work.pool.activate(work.learner.slot)
        with torch.no_grad():
            out = work.pool.model(input_ids=public.input_ids, attention_mask=public.attention_mask)
        return out.logits[:, :-1].float().topk(k, dim=-1)

    def distance(mask):
        dist = PredictionDistance(2, k=k)
        dist.add_topk([full_logits(w) for w in (a, b)], attention_mask=mask)
        return dist.distances()

    response = (public.labels[:, 1:] != IGNORE_INDEX).long()
    assert torch.allclose(got, distance(response), rtol=1e-5, atol=1e-6)
    prompts_too = public.attention_mask[:, 1:]
    assert not torch.allclose(got, distance(prompts_too), rtol=1e-3)  # prompt positions would change it


def test_the_split_rule_is_by_example_deterministic_and_capped(tmp_path):
    cfg = config_from_dict(gen_tree(tmp_path, data={"max_train_windows": 3}))
    _, tokenizer, _ = load_model(cfg, console=Console(quiet=True))
    one = client_data(cfg.data, 4, tokenizer, 0)
    two = client_data(cfg.data, 4, tokenizer, 0)
    for c, d in zip(one.clients, two.clients, strict=True):
        assert torch.equal(c.train.input_ids, d.train.input_ids)
        assert (len(c.train), len(c.val), len(c.test)) == (3, 1, 1)  # caps: train 3; val/test 10% -> 1
        assert len(c.test_requests) == len(c.test)
        assert len(c.label_counts) == 1  # one label per client (partition one_label)
    assert len(one.public) == 4


# ---- refused before any model loads --------------------------------------------------------------------
def write_config(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_bad_generation_file_of_data_clients_is_refused_with_its_line_before_the_model_loads(tmp_path):
    good = write_examples(tmp_path / "good.jsonl", 6, ("ants",))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": f"{CANARY} a", "response": "b"})
        + "\n"
        + json.dumps({"prompt": f"{CANARY} no response here"})
        + "\n"
    )
    tree = gen_tree(tmp_path, data={"clients": [str(good), str(bad)]}, federation={"clients": 2})
    del tree["data"]["path"]
    result = runner.invoke(app, ["run", str(write_config(tmp_path, tree))])
    assert result.exit_code == 2, result.output
    assert f"{bad}:2" in " ".join(result.output.split()) or "bad.jsonl:2" in result.output
    assert "no response" in result.output
    assert CANARY not in result.output
    assert "model tiny" not in result.output  # refused before the model was loaded
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"kind": "text", "layout": "chat"}, "data.layout is read by generation data only"),
        ({"sources": [{"corpus": "wikipedia"}], "path": None}, "has no generation task"),
        (
            {"text_column": "body", "clients": ["a.jsonl"] * 4, "path": None},
            "data.text_column names the text",
        ),
    ],
)
def test_meaningless_generation_settings_are_refused(tmp_path, data, fragment):
    tree = gen_tree(tmp_path, data=data)
    tree["data"] = {k: v for k, v in tree["data"].items() if v is not None}
    if data.get("kind") == "text":
        tree["data"] = {"kind": "text", "layout": "chat"}
    result = runner.invoke(app, ["run", str(write_config(tmp_path, tree))])
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.output.split())
    assert "model tiny" not in result.output


def test_compare_variants_decode_round_zero_once_and_log_what_each_alone_logs(tmp_path, monkeypatch):
    """Every variant of a comparison starts from the same base and adapters: each client's round-0
    evaluation (perplexities and test generations) runs once, not once per variant, and every variant
    logs the numbers it logs when run on its own. Later rounds (different adapters) are all evaluated."""
    from cotune.runtime import client

    calls: list[int] = []
    real = client.evaluate_generation

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(client, "evaluate_generation", counting)
    cfg = config_from_dict(gen_tree(tmp_path, run={"compare": ["local", "fedavg"]}))
    dirs = run_experiment(cfg, tmp_path / "runs" / "g")
    # 4 clients: round 0 once; rounds 1 and 2 by each of the 3 variants
    assert len(calls) == 4 + 3 * 2 * 4

    def numbers(d: Path, kind: str) -> list[tuple]:
        keep = ("round", "client", "split", "ppl", "loss", "rouge_l", "f1", "exact_match")
        return sorted(tuple(m.get(k) for k in keep) for m in records(d, kind))

    calls.clear()
    alone = config_from_dict(gen_tree(tmp_path, strategy={"name": "fedavg"}, run={"name": "alone"}))
    (single,) = run_experiment(alone, tmp_path / "runs" / "alone")
    assert len(calls) == 3 * 4
    for kind in ("gen", "eval"):
        assert numbers(single, kind) == numbers(dirs[2], kind)  # run.compare's fedavg = fedavg alone
        zero = [[x for x in numbers(d, kind) if x[0] == 0] for d in dirs]
        assert zero[0] == zero[1] == zero[2]


# ---- resume ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["decoding", "logging"])
def test_a_run_stopped_during_a_generation_evaluation_resumes_to_the_same_records_and_adapters(
    tmp_path, monkeypatch, where
):
    """Stopped in round 1's evaluation while the second client decodes its test prompts (nothing of the
    round's evaluation logged), or after its validation and test records were logged but before its
    generation scores: the resumed run completes the round (no record logged twice) and ends with the
    uninterrupted run's records and adapters."""
    from safetensors.torch import load_file
    from tests.test_round_scaffold import Stopped, check_stopped_and_resumed, stop_in

    from cotune.runtime import client, personalized
    from cotune.runtime.checkpoint import latest_checkpoint

    def cfg(name: str):
        data = {"test_fraction": 0.3, "max_test_windows": 2}  # two test examples per client to decode
        return config_from_dict(gen_tree(tmp_path, run={"name": name}, data=data))

    (full,) = run_experiment(cfg("full"))
    part = tmp_path / "runs" / "part"
    if where == "logging":
        stop_in(monkeypatch, personalized.PersonalizedLoop, "gen_record", 1, 2)
    else:
        real, seen = client.evaluate_generation, []

        def stopping(*args, **kwargs):
            seen.append(1)
            if len(seen) == 4 + 2:  # round 0: the 4 clients; round 1: the second client
                raise Stopped
            return real(*args, **kwargs)

        monkeypatch.setattr(client, "evaluate_generation", stopping)
    check_stopped_and_resumed(monkeypatch, personalized.PersonalizedLoop, cfg("part"), part, full, 2)
    gens = [(g["round"], g["client"]) for g in records(part, "gen")]
    evals = [(e["round"], e["client"], e["split"]) for e in records(part, "eval")]
    assert len(gens) == len(set(gens)) == 3 * 4 and len(evals) == len(set(evals)) == 3 * 4 * 2
    assert all(g["n"] == 2 for g in records(part, "gen"))

    def adapters(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
        dirs = sorted(latest_checkpoint(run_dir)[1].glob("client-*"))
        return {d.name: load_file(str(d / "adapter_model.safetensors")) for d in dirs}

    ours, theirs = adapters(part), adapters(full)
    assert ours.keys() == theirs.keys() and len(ours) == 4
    assert all(torch.equal(ours[c][k], theirs[c][k]) for c in ours for k in ours[c])
