"""Partial participation (`federation.clients_per_round`): a seeded draw per round, in both families,
on both transports, with resume and DP accounting that know about it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_tree
from tests.test_cotuning import task_file, tree  # noqa: F401  (task_file is a fixture)

from cotune.config import config_from_dict
from cotune.reporting.metrics import read_metrics
from cotune.runtime.checkpoint import list_checkpoints
from cotune.runtime.experiment import resume_experiment, run_experiment
from cotune.runtime.membership import participants


def records(run_dir: Path, kind: str) -> list[dict]:
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if m["type"] == kind]


def adapters(run_dir: Path, round_: int) -> dict[str, dict[str, torch.Tensor]]:
    path = dict(list_checkpoints(run_dir))[round_]
    return {d.name: load_file(str(d / "adapter_model.safetensors")) for d in sorted(path.glob("client-*"))}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def personalized(corpus_dir, tmp_path, **federation):
    fed = {"rounds": 3, "clients_per_round": 2, **federation}
    return config_from_dict(
        tiny_tree(corpus_dir, tmp_path, federation=fed, strategy={"name": "validation"}, run={"threads": 1})
    )


def test_each_round_trains_the_drawn_clients_and_the_others_keep_their_adapters(corpus_dir, tmp_path):
    cfg = personalized(corpus_dir, tmp_path)
    (run_dir,) = run_experiment(cfg, tmp_path / "run")
    for r in (1, 2, 3):
        drawn = participants(cfg, r, [0, 1, 2, 3])
        assert len(drawn) == 2
        assert sorted(t["client"] for t in records(run_dir, "train") if t["round"] == r) == drawn
        (trust,) = [t for t in records(run_dir, "trust") if t["round"] == r]
        assert trust["participants"] == drawn
        before, after = adapters(run_dir, r - 1), adapters(run_dir, r)
        for c in range(4):
            name = f"client-{c:02d}"
            assert same(before[name], after[name]) == (c not in drawn)
        # every client is still evaluated, drawn or not
        evals = [e for e in records(run_dir, "eval") if e["round"] == r and e["split"] == "test"]
        assert sorted(e["client"] for e in evals) == [0, 1, 2, 3]
    assert len({tuple(participants(cfg, r, [0, 1, 2, 3])) for r in range(1, 30)}) > 1  # not one fixed set


def test_a_fraction_draws_its_share_and_the_draw_is_refused_when_meaningless(corpus_dir, tmp_path):
    cfg = personalized(corpus_dir, tmp_path, clients_per_round=0.5)
    assert cfg.federation.sampled_per_round == 2
    with pytest.raises(ValueError, match=r"a count must be a whole number <= federation\.clients"):
        personalized(corpus_dir, tmp_path, clients_per_round=5)
    with pytest.raises(ValueError, match="a count must be a whole number"):
        personalized(corpus_dir, tmp_path, clients_per_round=2.5)
    with pytest.raises(ValueError, match="no round could go on"):
        personalized(corpus_dir, tmp_path, min_clients=3)


def test_a_run_with_partial_participation_resumes_exactly(corpus_dir, tmp_path):
    cfg = personalized(corpus_dir, tmp_path, clients_per_round=3)
    (whole,) = run_experiment(cfg, tmp_path / "whole")
    (cut,) = run_experiment(cfg, tmp_path / "cut")
    shutil.rmtree(cut / "checkpoints" / "round-0003")
    shutil.rmtree(cut / "checkpoints" / "round-0002")
    resume_experiment(cut)
    ours, theirs = adapters(whole, 3), adapters(cut, 3)
    assert all(same(ours[c], theirs[c]) for c in ours)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedcollm"])
def test_fedcollm_family_averages_the_drawn_clients(task_file, tmp_path, algorithm):  # noqa: F811
    cfg = config_from_dict(tree(task_file, tmp_path, algorithm, federation={"clients_per_round": 2}))
    (run_dir,) = run_experiment(cfg, tmp_path / "run")
    for r in (1, 2):
        drawn = participants(cfg, r, [0, 1, 2])
        assert (
            sorted(t["client"] for t in records(run_dir, "train") if t["round"] == r and t["model"] == "slm")
            == drawn
        )
        assert sorted(c["client"] for c in records(run_dir, "comm") if c["round"] == r) == drawn


@pytest.mark.slow
def test_dp_accounts_for_the_sampling_rate(corpus_dir, tmp_path):
    private = {"clip_norm": 0.05, "noise_multiplier": 1.0, "seed": 3}
    full = config_from_dict(tiny_tree(corpus_dir, tmp_path, privacy=private, federation={"rounds": 2}))
    half = config_from_dict(
        tiny_tree(corpus_dir, tmp_path, privacy=private, federation={"rounds": 2, "clients_per_round": 2})
    )
    eps = {}
    for name, cfg in (("full", full), ("half", half)):
        (run_dir,) = run_experiment(cfg, tmp_path / name)
        spent = [r for r in records(run_dir, "privacy") if r["event"] == "spent"]
        eps[name] = spent[-1]["epsilon"]
        assert spent[-1]["sample_rate"] == (1.0 if name == "full" else 0.5)
    assert eps["half"] < eps["full"]
