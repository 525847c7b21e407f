"""FedCoLLM with the real SmolLM2-135M standing in for both the server LLM and the client SLM."""

from __future__ import annotations

import json

import pytest

from cotune.config import config_from_dict
from cotune.reporting.metrics import read_metrics
from cotune.runtime.experiment import run_experiment

pytestmark = pytest.mark.integration

SMOL = {"name": "smollm2-135m-instruct"}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _task(tmp_path):
    path = tmp_path / "task.jsonl"
    colours = ["red", "green", "blue"]
    rows = [
        {
            "prompt": f"The car is {colours[i % 3]}. What colour is the car?\nAnswer:",
            "choices": [" red", " green", " blue"],
            "answer": i % 3,
        }
        for i in range(30)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _tree(tmp_path, llm_model):
    return {
        "algorithm": "fedcollm",
        "device": "cpu",
        "model": SMOL,
        "lora": LORA,
        "llm": {"model": llm_model, "lora": LORA},
        "task": {"path": str(_task(tmp_path)), "test_fraction": 0.2, "max_length": 64},
        "distill": {"topk": 16},
        "train": {"lr": 1e-3, "batch_size": 4, "eval_batch_size": 8},
        "federation": {"clients": 2, "rounds": 1, "local_steps": 1},
        "run": {"seed": 0, "out_dir": str(tmp_path / "runs"), "name": "smol"},
    }


def test_one_fedcollm_round_with_smollm2_in_both_roles(tmp_path):
    cfg = config_from_dict(_tree(tmp_path, SMOL))
    cfg.distill.max_steps = 2
    (run_dir,) = run_experiment(cfg)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    distill = [m for m in metrics if m["type"] == "distill"]
    assert len(distill) == 1 and distill[0]["step"] == 2
    # identical base models and identical zero-initialised LoRA B: the first KL is tiny, the CE is not
    assert distill[0]["slm_ce"] > 0.0
    comm = [m for m in metrics if m["type"] == "comm"]
    assert len(comm) == 2 and all(c["ratio"] < 0.01 for c in comm)  # adapter << 0.5 GB model
    mc = [m for m in metrics if m["type"] == "mc"]
    assert {(m["round"], m["model"]) for m in mc} == {(0, "slm"), (0, "llm"), (1, "slm"), (1, "llm")}
    # the SmolLM2 instruct model reads the answer in the prompt above chance (1/3) zero-shot (0.67 measured)
    zero = next(m for m in mc if m["round"] == 0 and m["model"] == "slm")
    assert zero["acc"] > 0.5


def test_an_llm_with_another_tokenizer_is_distilled_across_tokenizers(tmp_path):
    """SmolLM2 clients with a tiny byte-level LLM: no longer refused; the alignment figures are logged."""
    cfg = config_from_dict(_tree(tmp_path, {"name": "tiny"}))
    cfg.distill.max_steps = 1
    (run_dir,) = run_experiment(cfg)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    align = [m for m in metrics if m["type"] == "align"]
    assert {a["model"] for a in align} == {"slm", "llm"}
    assert all(a["positions"] > 0 and a["carried_share"] > 0 for a in align)
    mc = [m for m in metrics if m["type"] == "mc"]
    assert {(m["round"], m["model"]) for m in mc} == {(0, "slm"), (0, "llm"), (1, "slm"), (1, "llm")}
