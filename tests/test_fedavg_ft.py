"""fedavg_ft, the control that isolates the LLM's contribution to FedCoLLM's SLM: FedAvg, then the same
server steps on D_a as FedCoLLM's SLM side with cross-entropy alone (lambda = 0) and the same selection
(distill.keep), without loading the LLM."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tests.test_cotuning import records, task_file, tree  # noqa: F401  (task_file is a fixture)

from cotune.config import config_from_dict
from cotune.data.corpora import DataError
from cotune.runtime import embedded, setup
from cotune.runtime.experiment import run_experiment

DROPOUT = {"r": 2, "alpha": 8, "dropout": 0.3, "target_modules": ["q_proj", "v_proj"]}


def adapters(run_dir, round_):
    """Every adapter a run's checkpoint of `round_` holds, by part (server, server-llm, client-NN)."""
    ckpt = run_dir / "checkpoints" / f"round-{round_:04d}"
    return {p.name: load_file(str(p / "adapter_model.safetensors")) for p in ckpt.iterdir() if p.is_dir()}


@pytest.mark.parametrize("keep", ["last", "best"])
@pytest.mark.slow
def test_the_control_is_fedcollms_slm_side_with_lambda_zero_bit_for_bit(task_file, tmp_path, keep):  # noqa: F811
    """Same splits, same client randomness (LoRA dropout on), the same selection (distill.keep): fedcollm
    with distill.lam 0 and fedavg_ft end every round with equal SLM adapters (server and clients), equal
    server losses, validation scores at every step and kept steps; with keep 'last' fedcollm at lambda 1
    ends elsewhere (the comparison can fail)."""
    distill = {"lam": 0.0, "keep": keep, "slm_lr": 0.05}
    cfg = tree(task_file, tmp_path, lora=DROPOUT, distill=distill, run={"compare": ["fedavg_ft"]})
    fed0, control = run_experiment(config_from_dict(cfg))
    for rnd in (1, 2):
        a, b = adapters(fed0, rnd), adapters(control, rnd)
        assert "server-llm" in a and "server-llm" not in b
        assert set(b) == set(a) - {"server-llm"}
        for part in b:
            assert a[part].keys() == b[part].keys()
            for key in b[part]:
                assert torch.equal(a[part][key], b[part][key]), (rnd, part, key)
    if keep == "last":
        one = tree(task_file, tmp_path, lora=DROPOUT, distill={**distill, "lam": 1.0}, run={"name": "lam1"})
        (fed1,) = run_experiment(config_from_dict(one))
        a, c = adapters(fed0, 1)["server"], adapters(fed1, 1)["server"]
        assert any(not torch.equal(a[k], c[k]) for k in a)
    d0, dc = records(fed0, "distill"), records(control, "distill")
    assert [(d["step"], d["slm_ce"], d["slm_kept"]) for d in d0] == [
        (d["step"], d["slm_ce"], d["slm_kept"]) for d in dc
    ]
    assert all(d["slm_kd"] == 0.0 and d["llm_ce"] == 0.0 and d["llm_kept"] is None for d in dc)
    slm_val = [
        (v["round"], v["step"], v["acc"], v["nll"])
        for v in records(fed0, "distill_val")
        if v["model"] == "slm"
    ]
    assert slm_val == [(v["round"], v["step"], v["acc"], v["nll"]) for v in records(control, "distill_val")]
    assert {v["model"] for v in records(control, "distill_val")} == {"slm"}
    fed_mc = {(m["round"], m["acc"]) for m in records(fed0, "mc") if m["model"] == "slm"}
    assert fed_mc == {(m["round"], m["acc"]) for m in records(control, "mc")}


@pytest.mark.slow
def test_the_control_never_loads_the_llm(task_file, tmp_path, monkeypatch):  # noqa: F811
    """fedavg_ft alone loads one model (the SLM), builds no LLM pool and scores no LLM."""
    loaded = []
    real = setup.load_base_model

    def spy(model, *args, **kwargs):
        loaded.append(model.tiny.hidden_size)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(setup, "load_base_model", spy)
    (run_dir,) = run_experiment(config_from_dict(tree(task_file, tmp_path, "fedavg_ft")))
    assert loaded == [32]  # the SLM (hidden 32), never the LLM (hidden 48)
    assert {m["model"] for m in records(run_dir, "mc")} == {"slm"}
    assert "server-llm" not in adapters(run_dir, 2)
    assert records(run_dir, "distill") and records(run_dir, "comm")


@pytest.mark.slow
def test_compare_runs_the_control_on_the_same_splits(task_file, tmp_path, monkeypatch):  # noqa: F811
    """run.compare accepts fedavg_ft; the comparison builds one task split for all its variants, and the
    control's clients train in round 1 exactly as fedavg's (it differs only after the average)."""
    splits = []
    real = embedded.load_task
    monkeypatch.setattr(embedded, "load_task", lambda *a, **k: splits.append(1) or real(*a, **k))
    last = {"keep": "last"}  # keep 'best' may keep step 0, the average itself
    cfg = tree(
        task_file, tmp_path, "fedavg", lora=DROPOUT, distill=last, run={"compare": ["fedavg_ft", "fedcollm"]}
    )
    fedavg, control, fed = run_experiment(config_from_dict(cfg))
    assert splits == [1]
    assert control.name.endswith(".fedavg_ft")

    def round_one(run_dir):
        return {m["client"]: m["loss"] for m in records(run_dir, "train") if m["round"] == 1}

    assert round_one(fedavg) == round_one(control) == round_one(fed)
    assert not records(fedavg, "distill") and records(control, "distill")
    a, b = adapters(fedavg, 1)["server"], adapters(control, 1)["server"]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the server steps moved theta


def test_the_control_with_too_few_examples_for_a_public_set_stops_before_training(tmp_path):
    """No public set, no server steps: refused (as for fedcollm) before any round runs."""
    import json

    path = tmp_path / "tiny.jsonl"
    path.write_text(
        "\n".join(json.dumps({"prompt": f"q{i}", "choices": [" a", " b"], "answer": i % 2}) for i in range(4))
    )
    cfg = config_from_dict(tree(path, tmp_path, "fedavg_ft", federation={"clients": 3}))
    with pytest.raises(DataError, match="public"):
        run_experiment(cfg)
    assert not list((tmp_path / "runs").glob("*/metrics.jsonl"))
