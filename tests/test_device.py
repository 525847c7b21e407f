"""The checks bench/gpu_check.sh runs on an accelerator: marked `device`, on COTUNE_TEST_DEVICE (cpu here,
cuda there) in COTUNE_TEST_DTYPE (float32 here, bfloat16 there). On CPU they run in every test suite."""

from __future__ import annotations

import os

import pytest
import torch
from tests.conftest import tiny_tree

from cotune.config import config_from_dict
from cotune.config.schema import LoraSettings, TinyModelConfig, TrainConfig
from cotune.evaluation import multiple_choice as mc
from cotune.models.lora import AdapterPool
from cotune.models.tiny import build_tiny_model, byte_tokenizer
from cotune.reporting.metrics import read_metrics
from cotune.runtime.experiment import run_experiment
from cotune.training.learner import Learner
from cotune.training.together import train_together

pytestmark = pytest.mark.device
DEVICE = torch.device(os.environ.get("COTUNE_TEST_DEVICE", "cpu"))
DTYPE_NAME = os.environ.get("COTUNE_TEST_DTYPE", "float32")
DTYPE = getattr(torch, DTYPE_NAME)
TOL = 1e-5 if DTYPE_NAME == "float32" else 3e-2  # bf16 keeps 8 bits of mantissa


def _model() -> torch.nn.Module:
    return build_tiny_model(TinyModelConfig(), len(byte_tokenizer())).to(DEVICE, DTYPE).eval()


def test_shared_context_scores_match_per_choice_scores_on_the_device():
    tok, model = byte_tokenizer(), _model()
    prompts = ["The capital of France is", "A longer prompt about fruit and vegetables:"]
    requests = [mc.encode_pair(tok, p, c) for p in prompts for c in [" Paris", " apples and pears", " no"]]
    shared = mc.score_requests(model, requests, batch_size=4)
    alone = [mc.score_requests(model, [r])[0] for r in requests]
    scale = max(abs(a) for a in alone)
    assert max(abs(a - b) for a, b in zip(shared, alone, strict=True)) <= TOL * scale


@pytest.mark.slow
def test_clients_trained_together_match_one_by_one_on_the_device():
    names = ["c0", "c1", "c2", "c3"]
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 250, (16, 32), generator=g) for _ in names]
    cfg = TrainConfig(lr=1e-2, batch_size=4)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    finals = []
    for together in (False, True):
        torch.manual_seed(1)
        pool = AdapterPool(_model(), settings, names)
        learners = [
            Learner(pool, n, d, cfg, 4, i, DEVICE) for i, (n, d) in enumerate(zip(names, data, strict=True))
        ]
        if together:
            train_together(learners, [2] * len(names))
        else:
            for learner in learners:
                learner.train(2)
        finals.append({n: pool.state(n) for n in names})
    for n in names:
        for k, v in finals[0][n].items():
            assert v.device.type == DEVICE.type
            assert (v.float() - finals[1][n][k].float()).abs().max().item() <= TOL * max(
                1.0, v.abs().max().item()
            )


@pytest.mark.slow
def test_a_personalized_run_trains_on_the_device(corpus_dir, tmp_path):
    tree = tiny_tree(corpus_dir, tmp_path, strategy={"name": "validation"})
    tree["device"] = DEVICE.type
    tree["model"]["dtype"] = DTYPE_NAME
    (run_dir,) = run_experiment(config_from_dict(tree))
    records = read_metrics(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    evals = [r for r in records if r["type"] == "eval" and r["split"] == "test"]
    assert {r["round"] for r in evals} == {0, 1, 2}
