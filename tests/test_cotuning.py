"""FedCoLLM and its baselines through the embedded runtime (tiny models, synthetic task)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from cotune.algorithms.fedcollm import aggregate_slm, check_payload
from cotune.config import ConfigError, config_from_dict
from cotune.data.corpora import DataError
from cotune.models.compat import same_tokenizer
from cotune.models.tiny import byte_tokenizer
from cotune.reporting.metrics import read_metrics
from cotune.runtime import fedcollm
from cotune.runtime.client import ClientWork
from cotune.runtime.experiment import resume_experiment, run_experiment

ALGORITHMS = ["fedcollm", "fedavg", "standalone", "centralized", "zero_shot"]


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    """A 3-way task whose answer is spelled out in the prompt: learnable by a tiny model."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    words = ["red", "green", "blue"]
    rows = []
    for i in range(90):
        answer = i % 3
        noise = " ".join(rng.choice(["a", "b", "c", "d"]) for _ in range(6))
        rows.append(
            {
                "prompt": f"{noise} colour {words[answer]}. Which colour?",
                "choices": [" red", " green", " blue"],
                "answer": answer,
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def tree(task_file, tmp_path, algorithm="fedcollm", **extra):
    small = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
    t = {
        "algorithm": algorithm,
        "device": "cpu",
        "model": {"name": "tiny", "tiny": {**small, "seed": 1}},
        "lora": {"r": 2, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "llm": {
            "model": {
                "name": "tiny",
                "tiny": {
                    "hidden_size": 48,
                    "num_layers": 2,
                    "num_heads": 2,
                    "intermediate_size": 96,
                    "seed": 2,
                },
            },
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        },
        "task": {"path": str(task_file), "test_fraction": 0.2, "max_length": 96},
        "train": {"lr": 1e-2, "batch_size": 6, "eval_batch_size": 16},
        "federation": {"clients": 3, "rounds": 2, "local_steps": 2},
        "run": {"seed": 0, "out_dir": str(tmp_path / "runs"), "name": "t"},
    }
    for key, value in extra.items():
        t[key] = {**t.get(key, {}), **value} if isinstance(value, dict) else value
    return t


def records(run_dir, kind):
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if m["type"] == kind]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.slow
def test_every_algorithm_runs_through_the_same_round(task_file, tmp_path, algorithm):
    (run_dir,) = run_experiment(config_from_dict(tree(task_file, tmp_path, algorithm)))
    mc = records(run_dir, "mc")
    rounds = {m["round"] for m in mc}
    assert rounds == ({0} if algorithm == "zero_shot" else {0, 1, 2})
    assert {m["model"] for m in mc if m["round"] == 0} == (
        {"slm"} if algorithm in ("fedavg", "standalone") else {"slm", "llm"}
    )
    assert bool(records(run_dir, "distill")) == (algorithm == "fedcollm")
    assert bool(records(run_dir, "comm")) == (algorithm in ("fedcollm", "fedavg"))
    final = [m for m in mc if m["round"] == 2]
    if algorithm == "standalone":
        assert sorted(m["client"] for m in final) == [0, 1, 2]
    if algorithm == "centralized":
        assert [m["model"] for m in final] == ["llm"]
    for m in mc:
        assert 0.0 <= m["acc"] <= 1.0 and m["n"] > 0


class Spy(fedcollm.FedCoLLMLoop):
    """Records the adapters at the moments the round hands them on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.starts, self.averages, self.distilled, self.uploads = [], [], [], []

    def train_clients(self, r, payload):
        updates, mean = super().train_clients(r, payload)
        self.uploads.append([updates[k] for k in sorted(updates)])
        return updates, mean

    def aggregate(self, r, trained):
        super().aggregate(r, trained)
        self.averages.append(self.server.slm.state(fedcollm.SERVER)) if not self.plan.distill else None

    def distill(self, r):
        self.averages.append(self.server.slm.state(fedcollm.SERVER))
        super().distill(r)
        self.distilled.append(self.server.slm.state(fedcollm.SERVER))
        self.llm_state = self.server.llm.state(fedcollm.LLM_ADAPTER)


@pytest.fixture
def spy(monkeypatch):
    """The loops built by run_experiment, with `starts`: each client's adapter as its training begins."""
    made = []
    real_train = ClientWork.train

    def factory(*args, **kwargs):
        made.append(Spy(*args, **kwargs))
        return made[-1]

    def train(work, *args, **kwargs):
        made[-1].starts.append(work.adapter())
        return real_train(work, *args, **kwargs)

    monkeypatch.setattr("cotune.runtime.compose.FedCoLLMLoop", factory)
    monkeypatch.setattr(ClientWork, "train", train)
    return made


@pytest.mark.slow
def test_clients_start_the_next_round_from_the_distilled_adapter(task_file, tmp_path, spy):
    run_experiment(config_from_dict(tree(task_file, tmp_path, distill={"keep": "last"})))  # the paper's rule
    rt = spy[0]
    n = rt.n
    round2_starts = rt.starts[n : 2 * n]
    for start in round2_starts:
        for key, value in rt.distilled[0].items():
            assert torch.equal(start[key], value)
    assert any(not torch.equal(rt.distilled[0][k], rt.averages[0][k]) for k in rt.averages[0])


@pytest.mark.slow
def test_server_average_is_weighted_by_client_examples(task_file, tmp_path, spy):
    run_experiment(config_from_dict(tree(task_file, tmp_path, "fedavg")))
    rt = spy[0]
    expected = aggregate_slm(rt.uploads[-1], rt.task.client_sizes)
    server = rt.averages[-1]
    for key in expected:
        torch.testing.assert_close(server[key], expected[key])


@pytest.mark.slow
def test_payload_holds_the_slm_adapter_only(task_file, tmp_path, spy):
    run_experiment(config_from_dict(tree(task_file, tmp_path)))
    rt = spy[0]
    payload = rt.distilled[-1]  # what is broadcast next round
    check_payload(payload, rt.slm_shapes)
    assert all("lora_" in k for k in payload)
    # the starts of round 2 are exactly that payload: nothing of the LLM's LoRA reached a client
    llm_state = rt.llm_state
    for start in rt.starts[rt.n :]:
        assert start.keys() == payload.keys()
        assert all(start[k].shape != llm_state[k].shape for k in start)
    with pytest.raises(ValueError, match="not exactly the SLM adapter"):
        check_payload(llm_state, rt.slm_shapes)  # same key names, other shapes: refused
    with pytest.raises(ValueError, match="extra keys"):
        check_payload({**payload, "server.lora_A.weight": torch.zeros(1)}, rt.slm_shapes)


@pytest.mark.slow
def test_communication_is_the_adapter_size(task_file, tmp_path):
    (run_dir,) = run_experiment(config_from_dict(tree(task_file, tmp_path, "fedavg")))
    comm = records(run_dir, "comm")
    assert len(comm) == 2 * 3
    # r=2 on q_proj and v_proj of one layer of width 32: 2 modules x (2x32 + 32x2) fp32 values
    assert {c["bytes_up"] for c in comm} == {c["bytes_down"] for c in comm} == {2 * (64 + 64) * 4}
    assert all(0 < c["ratio"] < 0.1 for c in comm)


@pytest.mark.slow
def test_distillation_trains_the_llm_only_on_the_server(task_file, tmp_path, spy):
    run_experiment(config_from_dict(tree(task_file, tmp_path, distill={"topk": 8})))
    rt = spy[0]
    d = records(rt.files.run_dir, "distill")
    assert [r["round"] for r in d] == [1, 2] and all(r["topk"] == 8 for r in d)
    # top-k teacher signal: (values fp32 + indices int64) for k=8 per position, far below the full vocabulary
    assert all(0 < r["teacher_bytes"] < 8 * 12 * 96 * 258 for r in d)
    ckpt = (
        rt.files.run_dir / "checkpoints" / "round-0002" / fedcollm.LLM_ADAPTER / "adapter_model.safetensors"
    )
    assert ckpt.is_file()


@pytest.mark.slow
def test_cotuning_resume_ends_with_the_same_adapters(task_file, tmp_path):
    import shutil

    from safetensors.torch import load_file

    (full,) = run_experiment(config_from_dict(tree(task_file, tmp_path, run={"name": "full"})))
    (part,) = run_experiment(config_from_dict(tree(task_file, tmp_path, run={"name": "part"})))
    shutil.rmtree(part / "checkpoints" / "round-0002")
    resume_experiment(part)
    for sub in (fedcollm.SERVER, fedcollm.LLM_ADAPTER):
        a = load_file(str(full / "checkpoints" / "round-0002" / sub / "adapter_model.safetensors"))
        b = load_file(str(part / "checkpoints" / "round-0002" / sub / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("algorithm", "stop_at"), [("fedcollm", 0), ("standalone", 1)])
@pytest.mark.slow
def test_a_run_stopped_during_a_test_evaluation_resumes_it_without_training_again(
    task_file, tmp_path, monkeypatch, algorithm, stop_at
):
    """A round's checkpoint is written before its test evaluation (which can take longer than the
    round): a run stopped during the evaluation of round `stop_at`, after one client's accuracy was
    logged, trains nothing again on resume, scores only what was not logged, and ends as an
    uninterrupted run does."""
    from safetensors.torch import load_file

    (full,) = run_experiment(config_from_dict(tree(task_file, tmp_path, algorithm, run={"name": "full"})))
    original, calls = fedcollm.FedCoLLMLoop.log_mc, []

    def stops(self, r, pool, name, client, *more):
        calls.append(r)
        if calls.count(stop_at) == 2:
            raise RuntimeError("stopped")
        return original(self, r, pool, name, client, *more)

    monkeypatch.setattr(fedcollm.FedCoLLMLoop, "log_mc", stops)
    cfg = config_from_dict(tree(task_file, tmp_path, algorithm, run={"name": "part"}))
    with pytest.raises(RuntimeError, match="stopped"):
        run_experiment(cfg)
    part = tmp_path / "runs" / f"part.{algorithm}"
    assert len(records(part, "mc")) == 1 + stop_at  # fedcollm round 0: SLM, not LLM; standalone: + client 0
    trained, train = [], fedcollm.FedCoLLMLoop.train

    def counted(self, r):
        trained.append(r)
        return train(self, r)

    monkeypatch.setattr(
        fedcollm.FedCoLLMLoop, "log_mc", lambda self, r, *a: calls.append(r) or original(self, r, *a)
    )
    monkeypatch.setattr(fedcollm.FedCoLLMLoop, "train", counted)
    calls.clear()
    resume_experiment(part)
    assert trained == list(range(stop_at + 1, 3))  # the stopped round's training is not done again

    def key(m):
        return m["round"], m["model"], m["client"]

    mc_full, mc_part = records(full, "mc"), records(part, "mc")
    assert sorted(map(key, mc_part)) == sorted(map(key, mc_full))  # each once
    assert calls.count(stop_at) == sum(m["round"] == stop_at for m in mc_full) - 1  # only what was not logged
    assert {key(m): m["acc"] for m in mc_part} == {key(m): m["acc"] for m in mc_full}
    assert [(t["round"], t["client"]) for t in records(part, "train")] == [
        (t["round"], t["client"]) for t in records(full, "train")
    ]
    assert [r["round"] for r in records(part, "round")] == [1, 2]
    saved = sorted(d.name for d in (full / "checkpoints" / "round-0002").iterdir() if d.is_dir())
    assert len(saved) >= 3
    for sub in saved:
        a = load_file(str(full / "checkpoints" / "round-0002" / sub / "adapter_model.safetensors"))
        b = load_file(str(part / "checkpoints" / "round-0002" / sub / "adapter_model.safetensors"))
        assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_resuming_a_comparison_loads_the_models_once_and_scores_round_zero_once(
    task_file, tmp_path, monkeypatch
):
    """`cotune run --resume` of a comparison runs every unfinished sibling in one call: one model load,
    and the zero-shot test scores (the same models in every variant) computed once, not per sibling."""
    import shutil

    from cotune.runtime import embedded

    cfg = config_from_dict(tree(task_file, tmp_path, run={"name": "c", "compare": ["zero_shot", "fedavg"]}))
    main, zero_shot, fedavg = run_experiment(cfg)
    shutil.rmtree(zero_shot)  # never started
    shutil.rmtree(fedavg / "checkpoints")  # nothing completed
    loads, scored = [], []
    load, score = embedded.load_fedcollm_models, fedcollm.evaluate_multiple_choice
    monkeypatch.setattr(embedded, "load_fedcollm_models", lambda *a, **k: loads.append(1) or load(*a, **k))
    monkeypatch.setattr(
        fedcollm, "evaluate_multiple_choice", lambda *a, **k: scored.append(1) or score(*a, **k)
    )
    resume_experiment(main)
    assert len(loads) == 1
    both = records(zero_shot, "mc") + records(fedavg, "mc")
    assert sorted((m["model"], m["round"]) for m in records(zero_shot, "mc")) == [("llm", 0), ("slm", 0)]
    shared = [m for m in records(fedavg, "mc") if m["round"] == 0]
    assert shared and len(scored) == len(both) - len(shared)  # fedavg's round 0 is zero_shot's: not rescored
    assert {(m["model"], m["acc"]) for m in both if m["round"] == 0} == {
        (m["model"], m["acc"]) for m in records(main, "mc") if m["round"] == 0
    }


def test_missing_llm_section_and_task_are_config_errors(task_file, tmp_path):
    t = tree(task_file, tmp_path)
    del t["llm"]
    with pytest.raises(ConfigError, match="needs an 'llm' section"):
        config_from_dict(t)
    t = tree(task_file, tmp_path, "fedavg")
    del t["task"]
    with pytest.raises(ConfigError, match="needs a 'task' section"):
        config_from_dict(t)
    with pytest.raises(ConfigError, match="expected algorithms"):
        config_from_dict(tree(task_file, tmp_path, run={"compare": ["validation"]}))


def test_too_few_examples_for_a_public_set_stop_before_training(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text(
        "\n".join(json.dumps({"prompt": f"q{i}", "choices": [" a", " b"], "answer": i % 2}) for i in range(4))
    )
    cfg = config_from_dict(tree(path, tmp_path, federation={"clients": 3}))
    with pytest.raises(DataError):
        run_experiment(cfg)
    assert not list((tmp_path / "runs" / "t.fedcollm").glob("metrics.jsonl"))


def test_one_tokenizer_is_told_from_two():
    """Same vocabulary: FedCoLLM's own path; another (one token more): distillation across tokenizers."""
    a = byte_tokenizer()
    b = byte_tokenizer()
    b.add_tokens(["<extra>"])
    assert same_tokenizer(a, byte_tokenizer())
    assert not same_tokenizer(a, b)


@pytest.mark.slow
def test_compare_variants_score_the_zero_shot_models_once(task_file, tmp_path, monkeypatch):
    """Every variant starts from the same base + fresh adapter: its round-0 accuracy is computed once."""
    calls = []
    real = fedcollm.evaluate_multiple_choice

    def counting(model, *args, **kwargs):
        calls.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(fedcollm, "evaluate_multiple_choice", counting)
    compare = {"compare": ["zero_shot", "fedavg", "centralized"]}
    no_val = {"val_fraction": 0.0, "keep": "last"}  # the server's validation scoring calls the evaluator too
    dirs = run_experiment(config_from_dict(tree(task_file, tmp_path, run=compare, distill=no_val)))
    round0 = [
        {(m["model"], m["acc"], m["acc_norm"]) for m in records(d, "mc") if m["round"] == 0} for d in dirs
    ]
    assert round0[0] == round0[1] and {r[0] for r in round0[0]} == {"slm", "llm"}
    assert round0[2] <= round0[0] and round0[3] <= round0[0]  # fedavg: SLM only; centralized: both
    # fedcollm: 2 zero-shot + 2 rounds x (SLM + LLM); fedavg: 2 SLM rounds; centralized: 2 LLM rounds.
    assert len(calls) == 2 + 4 + 2 + 2
    # The same numbers as a variant run on its own, which scores its zero-shot models itself.
    calls.clear()
    (alone,) = run_experiment(config_from_dict(tree(task_file, tmp_path / "alone", "fedavg", distill=no_val)))
    alone0 = {(m["model"], m["acc"], m["acc_norm"]) for m in records(alone, "mc") if m["round"] == 0}
    assert alone0 == round0[2]
    assert len(calls) == 3


@pytest.mark.slow
def test_fedcollm_clients_trained_together_end_as_one_by_one(task_file, tmp_path):
    """federation.parallel_clients: 2 (answer-only batches of different widths, groups of 2 and 1): the
    clients' uploads, hence the server's adapters, match training one client after another."""
    from safetensors.torch import load_file

    dirs = {}
    for k in (1, 2):
        cfg = tree(task_file, tmp_path, federation={"parallel_clients": k}, run={"name": f"p{k}"})
        (dirs[k],) = run_experiment(config_from_dict(cfg))
    last = sorted((dirs[1] / "checkpoints").iterdir())[-1].name
    for part in ("server", "server-llm", "client-00", "client-02"):
        a = load_file(str(dirs[1] / "checkpoints" / last / part / "adapter_model.safetensors"))
        b = load_file(str(dirs[2] / "checkpoints" / last / part / "adapter_model.safetensors"))
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, part
    one, two = records(dirs[1], "train"), records(dirs[2], "train")
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)


@pytest.mark.slow
def test_clients_draw_the_same_randomness_in_every_algorithm(task_file, tmp_path):
    """With LoRA dropout on, nothing differs before round 1's aggregation: the clients' round-1 losses
    are bit-equal across fedcollm, fedavg and standalone (building the LLM, its adapter and the server
    learners draws nothing from the clients' streams); a client's round-2 losses differ only because
    what it is sent differs, so standalone (its own adapter) stays equal to itself across reruns."""
    dropout = {"r": 2, "alpha": 8, "dropout": 0.3, "target_modules": ["q_proj", "v_proj"]}
    cfg = tree(task_file, tmp_path, lora=dropout, run={"compare": ["fedavg", "standalone"]})
    dirs = run_experiment(config_from_dict(cfg))

    def round_one(run_dir):
        return {m["client"]: m["loss"] for m in records(run_dir, "train") if m["round"] == 1}

    first = [round_one(d) for d in dirs]
    assert len(first[0]) == 3
    assert first[0] == first[1] == first[2]
    # dropout is on: a run without it gives other losses (the test can fail)
    (off,) = run_experiment(
        config_from_dict(tree(task_file, tmp_path, algorithm="fedavg", run={"name": "off"}))
    )
    assert round_one(off) != first[0]


def test_fedcollm_on_per_owner_task_files(task_file, tmp_path):
    """task.clients: each client's own JSONL; the server's D_a and the test set from their own files."""
    lines = task_file.read_text().splitlines()
    parts = {
        "c0": lines[:20],
        "c1": lines[20:40],
        "c2": lines[40:50],
        "public": lines[50:70],
        "test": lines[70:90],
    }
    paths = {}
    for name, rows in parts.items():
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("\n".join(rows))
    owned = {"path": None, "clients": [str(paths[c]) for c in ("c0", "c1", "c2")]}
    owned |= {"public": str(paths["public"]), "test": str(paths["test"])}
    t = tree(task_file, tmp_path, distill={"val_fraction": 0.0, "keep": "last"})
    t["task"] = {k: v for k, v in t["task"].items() if k not in ("path", "test_fraction")} | owned
    t["task"] = {k: v for k, v in t["task"].items() if v is not None}
    (run_dir,) = run_experiment(config_from_dict(t))
    mc = [m for m in records(run_dir, "mc") if m["round"] == 2]
    assert mc and all(m["n"] == 20 for m in mc)  # the test file, all of it
    assert {m["client"] for m in records(run_dir, "train") if m["round"] == 1} == {0, 1, 2}
    from cotune.data.task_data import owned_splits

    splits = owned_splits(config_from_dict(t).task)
    assert [len(c) for c in splits.clients] == [20, 20, 10] and len(splits.public) == 20

    for bad, match in (
        ({"test": None}, "task.test"),
        ({"clients": owned["clients"][:2]}, "one per client"),
        ({"test_fraction": 0.3}, "already split by owner"),
    ):
        wrong = {**t, "task": {k: v for k, v in {**t["task"], **bad}.items() if v is not None}}
        with pytest.raises(ConfigError, match=match):
            config_from_dict(wrong)
