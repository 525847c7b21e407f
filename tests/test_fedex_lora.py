"""FedEx-LoRA (arXiv 2410.09432), added as one row of config.names.STRATEGY_SPECS: the clients keep
FedAvg's A and B, and the residual of the product goes into the base, so the model is the exact average."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_tree

from cotune.algorithms.personalized import TrustEvidence, aggregate
from cotune.algorithms.ranks import fedex_stack, rank_of, rank_slice
from cotune.config import config_from_dict
from cotune.config.schema import StrategyConfig
from cotune.data.windows import federated_data
from cotune.evaluation.lm import evaluate_lm
from cotune.runtime.checkpoint import list_checkpoints
from cotune.runtime.experiment import run_experiment
from cotune.runtime.results import open_tuned

A, B = "m.lora_A.weight", "m.lora_B.weight"
T = torch.tensor


def test_the_stack_is_the_exact_average_and_ends_with_fedavgs_adapter():
    """B A = diag(2, 0) and diag(0, 4): the product of the averaged factors, [[0.5, 1], [0.5, 1]], is not
    their average diag(1, 2); the stack's product is exactly diag(1, 2), and its last rank is FedAvg's."""
    c0 = {A: T([[2.0, 0.0]]), B: T([[1.0], [0.0]])}
    c1 = {A: T([[0.0, 4.0]]), B: T([[0.0], [1.0]])}
    half = torch.full((2, 2), 0.5)
    trust, mixed = aggregate(StrategyConfig(name="fedex_lora"), [c0, c1], TrustEvidence(2))
    assert torch.equal(trust, half) and mixed[0] is mixed[1]  # one global model
    stacked = fedex_stack([c0, c1], half)
    assert torch.equal(mixed[0][A], stacked[A]) and torch.equal(mixed[0][B], stacked[B])
    assert rank_of(stacked) == 2 + 1 + 1  # the clients' factors, -B_mean over A_mean, then (B_mean, A_mean)
    assert torch.equal(stacked[B] @ stacked[A], T([[1.0, 0.0], [0.0, 2.0]]))
    own, residual = rank_slice(stacked, 3, 4), rank_slice(stacked, 0, 3)
    assert torch.equal(own[A], T([[1.0, 2.0]])) and torch.equal(own[B], T([[0.5], [0.5]]))
    assert torch.equal(residual[B] @ residual[A], T([[0.5, -1.0], [-0.5, 1.0]]))  # mean(BA) - B_mean A_mean
    assert c0[A].tolist() == [[2.0, 0.0]]  # inputs untouched


def test_mixed_ranks_are_refused_for_it():
    """Its row does not accept mixed ranks: A and B are averaged element by element."""
    with pytest.raises(ValueError, match="strategy 'fedex_lora' mixes adapters element by element"):
        config_from_dict(
            {"strategy": {"name": "fedex_lora"}, "lora": {"ranks": [2, 4]}, "federation": {"clients": 2}}
        )


def _saved(run_dir, round_):
    path = dict(list_checkpoints(run_dir))[round_]
    return [load_file(str(p / "adapter_model.safetensors")) for p in sorted(path.glob("client-*"))]


def test_a_run_keeps_fedavgs_adapters_and_merges_the_residual(corpus_dir, tmp_path):
    def run(name):
        tree = tiny_tree(corpus_dir, tmp_path, strategy={"name": name}, run={"name": name})
        tree["federation"]["rounds"] = 1
        cfg = config_from_dict(tree)
        return cfg, run_experiment(cfg)[0]

    _, fedavg = run("fedavg")
    cfg, fedex = run("fedex_lora")
    r, clients = cfg.lora.r, cfg.federation.clients
    averaged = _saved(fedavg, 1)
    for saved, same in zip(_saved(fedex, 1), averaged, strict=True):
        # one PEFT adapter: the merged residual (the clients' factors and -B_mean), then the client's own
        assert rank_of(saved) == (clients + 1) * r + r
        own = rank_slice(saved, clients * r + r, rank_of(saved))
        assert all(torch.equal(own[k], same[k]) for k in same)  # bit for bit FedAvg's adapter
        residual = rank_slice(saved, 0, clients * r + r)
        products = [residual[k.replace("lora_A", "lora_B")] @ residual[k] for k in residual if "lora_A" in k]
        assert max(float(p.abs().max()) for p in products) > 0  # FedAvg's aggregation error, now in the base

    # the saved adapter on the original base is the model the run evaluated (the residual merged)
    tuned = open_tuned(fedex, client=1)
    data = federated_data(cfg.data, clients, tuned.tokenizer, cfg.run.seed)
    ppl = evaluate_lm(tuned.pool.model, data.clients[1].val, cfg.train.eval_batch_size).ppl
    evals = [json.loads(x) for x in (fedex / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    logged = [
        e["ppl"] for e in evals if e["round"] == 1 and e["client"] == 1 and e.get("split", "val") == "val"
    ]
    assert logged and ppl == pytest.approx(logged[0], rel=1e-5)
