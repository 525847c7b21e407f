"""Clients of different LoRA ranks: HetLoRA and FlexLoRA aggregation, per-client traffic (issue 16 item 3)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_tree

from cotune.algorithms.ranks import flexlora_mix, hetlora_mix, hetlora_weights, rank_of, resize_rank
from cotune.config import config_from_dict
from cotune.config.loader import ConfigError
from cotune.reporting.report import write_report
from cotune.runtime.checkpoint import list_checkpoints
from cotune.runtime.experiment import run_experiment
from cotune.runtime.results import open_tuned
from cotune.runtime.setup import adapter_pool, load_model

A, B = "m.lora_A.weight", "m.lora_B.weight"
T = torch.tensor


def _two_clients():
    """Client 0 at rank 1 with B A = diag(2, 0); client 1 at rank 2 with B A = diag(0, 4)."""
    c0 = {A: T([[2.0, 0.0]]), B: T([[1.0], [0.0]])}
    c1 = {A: T([[0.0, 4.0], [0.0, 0.0]]), B: T([[0.0, 0.0], [1.0, 0.0]])}
    return c0, c1


def test_resize_rank_pads_with_zeros_and_cuts_back_exactly():
    c0, _ = _two_clients()
    wide = resize_rank(c0, 3)
    assert wide[A].shape == (3, 2) and wide[B].shape == (2, 3) and rank_of(wide) == 3
    assert torch.equal(wide[B] @ wide[A], c0[B] @ c0[A])
    back = resize_rank(wide, 1)
    assert torch.equal(back[A], c0[A]) and torch.equal(back[B], c0[B])


def test_hetlora_by_hand():
    """||B A||_F is 2 and 4, so the weights are 1/3 and 2/3; A and B are averaged at rank 2 and client 0
    gets the first rank back."""
    c0, c1 = _two_clients()
    w = hetlora_weights([c0, c1])
    torch.testing.assert_close(w, T([1 / 3, 2 / 3], dtype=torch.float64))
    trust = w.float().expand(2, 2)
    out0, out1 = hetlora_mix([c0, c1], trust)
    torch.testing.assert_close(out1[A], T([[2 / 3, 8 / 3], [0.0, 0.0]]))
    torch.testing.assert_close(out1[B], T([[1 / 3, 0.0], [2 / 3, 0.0]]))
    torch.testing.assert_close(out0[A], T([[2 / 3, 8 / 3]]))
    torch.testing.assert_close(out0[B], T([[1 / 3], [2 / 3]]))
    assert c0[A].tolist() == [[2.0, 0.0]]  # inputs untouched


def test_flexlora_by_hand():
    """The mean of the products is diag(1, 2): the rank-2 client gets it exactly, the rank-1 client its best
    rank-1 part diag(0, 2), split evenly between B and A."""
    c0, c1 = _two_clients()
    out0, out1 = flexlora_mix([c0, c1], torch.full((2, 2), 0.5))
    torch.testing.assert_close(out1[B] @ out1[A], torch.diag(T([1.0, 2.0])))
    torch.testing.assert_close(out0[B] @ out0[A], torch.diag(T([0.0, 2.0])))
    torch.testing.assert_close(out0[B].abs().squeeze(), T([0.0, 2**0.5]))
    assert rank_of(out0) == 1 and rank_of(out1) == 2


def test_flexlora_is_the_truncated_svd_of_the_weighted_sum_of_products():
    g = torch.Generator().manual_seed(0)
    ranks, out_dim, in_dim = [2, 3, 5], 7, 6
    clients = [
        {A: torch.randn(r, in_dim, generator=g), B: torch.randn(out_dim, r, generator=g)} for r in ranks
    ]
    trust = torch.softmax(torch.randn(3, 3, generator=g), dim=1)
    mixed = flexlora_mix(clients, trust)
    for i, r in enumerate(ranks):
        target = sum(trust[i, j] * clients[j][B] @ clients[j][A] for j in range(3))
        u, s, vh = torch.linalg.svd(target)
        best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        torch.testing.assert_close(mixed[i][B] @ mixed[i][A], best, atol=1e-5, rtol=1e-5)


# ---- config ---------------------------------------------------------------------------------------------
def test_mixed_ranks_are_refused_where_they_mean_nothing(corpus_dir, tmp_path):
    def cfg(**sections):
        return config_from_dict(tiny_tree(corpus_dir, tmp_path, **sections))

    mixed = {"ranks": [1, 2, 3, 4]}
    with pytest.raises(ConfigError, match="strategy 'fedavg' mixes adapters element by element"):
        cfg(lora=mixed)
    with pytest.raises(ConfigError, match="strategy 'weight' mixes"):
        cfg(lora=mixed, strategy={"name": "hetlora"}, run={"compare": ["weight"]})
    with pytest.raises(ConfigError, match="strategy 'ffa_lora' mixes"):
        cfg(lora=mixed, strategy={"name": "validation"}, run={"compare": ["ffa_lora"]})
    cfg(lora=mixed, strategy={"name": "validation"}, run={"compare": ["prediction", "oracle", "local"]})
    with pytest.raises(ConfigError, match="lists 3 rank"):
        cfg(lora={"ranks": [1, 2, 3]}, strategy={"name": "hetlora"})
    with pytest.raises(ConfigError, match=r"tier\(s\) \['laptop'\]"):
        cfg(lora={"ranks": [1, "laptop", 3, 4], "tiers": {"phone": 2}}, strategy={"name": "hetlora"})
    with pytest.raises(ConfigError, match=r"lora\.tiers is read only through lora\.ranks"):
        cfg(lora={"tiers": {"phone": 2}})
    cfg(lora={"ranks": [2, 2, 2, 2]})  # one rank for all: any strategy
    tiers = cfg(
        lora={"ranks": ["phone", 8, "phone", 4], "tiers": {"phone": 2}}, strategy={"name": "flexlora"}
    )
    assert [tiers.lora.rank_of(i) for i in range(4)] == [2, 8, 2, 4] and tiers.lora.max_rank == 8


def test_every_transport_starts_each_client_from_the_same_cut_of_one_initialisation(corpus_dir, tmp_path):
    tree = tiny_tree(corpus_dir, tmp_path, lora={"ranks": [1, 2, 3, 4]}, strategy={"name": "hetlora"})
    cfg = config_from_dict(tree)
    everyone = adapter_pool(cfg, load_model(cfg)[0])
    alone = adapter_pool(cfg, load_model(cfg)[0], [2])  # a SuperNode's pool: its client only
    state = everyone.state("client-02")
    assert rank_of(state) == 3
    for k, v in alone.state("client-02").items():
        assert torch.equal(v, state[k])
    widest = everyone.state("client-03")
    for k, v in state.items():
        assert torch.equal(v, resize_rank(widest, 3)[k])
    for k, v in everyone.initial.items():  # the widest initialisation, whichever clients a pool holds
        assert torch.equal(v, alone.initial[k])


# ---- end to end ------------------------------------------------------------------------------------------
def _final(run_dir):
    _, path = list_checkpoints(run_dir)[-1]
    return [
        (load_file(str(p / "adapter_model.safetensors")), json.loads((p / "adapter_config.json").read_text()))
        for p in sorted(path.glob("client-*"))
    ]


def _records(run_dir, kind):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if f'"{kind}"' in x]


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora"])
def test_a_run_of_mixed_ranks_trains_saves_and_accounts_each_client_at_its_rank(
    corpus_dir, tmp_path, strategy
):
    ranks = [1, "mid", 3, 4]
    tree = tiny_tree(
        corpus_dir,
        tmp_path,
        lora={"r": 2, "ranks": ranks, "tiers": {"mid": 2}},
        strategy={"name": strategy},
        run={"name": strategy},
    )
    (run_dir,) = run_experiment(config_from_dict(tree))
    final = _final(run_dir)
    for (state, adapter_cfg), r in zip(final, [1, 2, 3, 4], strict=True):
        assert rank_of(state) == r and adapter_cfg["r"] == r
        assert adapter_cfg["lora_alpha"] == pytest.approx(8 * r / 2)  # the scale alpha / r stays 8 / 2
    products = [{k: s[k.replace("lora_A", "lora_B")] @ s[k] for k in s if "lora_A" in k} for s, _ in final]
    if strategy == "flexlora":  # every client holds a cut of one SVD: the rank-1 one is the widest's top part
        for k, wide in products[3].items():
            u, s, vh = torch.linalg.svd(wide)
            torch.testing.assert_close(
                products[0][k], s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-5, rtol=1e-4
            )
    trust = _records(run_dir, "trust")
    assert trust and all(m["matrix"][i] == m["matrix"][0] for m in trust for i in range(4))
    if strategy == "hetlora":
        assert len({round(x, 3) for x in trust[-1]["matrix"][0]}) > 1  # norm-weighted, not uniform
    comm = [c for c in _records(run_dir, "comm") if c["round"] == 1]
    assert [c["client"] for c in comm] == [0, 1, 2, 3]
    up = [c["bytes_up"] for c in comm]
    assert up == [up[0] * r for r in (1, 2, 3, 4)]  # bytes grow with the rank
    assert all(c["bytes_down"] == 2 * c["bytes_up"] for c in comm)  # sent to train and to evaluate
    report = write_report([run_dir]).read_text()
    assert "## Communication per client" in report and "| 2 (" in report
    tuned = open_tuned(run_dir, client=0)  # cotune eval / generate open a client of its own rank
    assert tuned.pool.ranks["client-00"] == 1


def _all_final(run_dir):
    _, path = list_checkpoints(run_dir)[-1]
    return {p.name: load_file(str(p / "adapter_model.safetensors")) for p in sorted(path.glob("client-*"))}


def test_mixed_ranks_resume_train_together_and_take_differential_privacy(corpus_dir, tmp_path):
    """A resumed run ends with the uninterrupted adapters; clients of different ranks trained in one shared
    batch (federation.parallel_clients) end where one-by-one training does; per-upload DP noise applies."""
    import shutil

    from cotune.runtime.experiment import resume_experiment

    def run(name, **sections):
        tree = tiny_tree(corpus_dir, tmp_path, lora={"ranks": [1, 2, 3, 4]}, run={"name": name}, **sections)
        return run_experiment(config_from_dict(tree))[0]

    whole = run("whole", strategy={"name": "flexlora"})
    cut = run("cut", strategy={"name": "flexlora"})
    shutil.rmtree(cut / "checkpoints" / "round-0002")
    resume_experiment(cut)
    a, b = _all_final(whole), _all_final(cut)
    assert all(torch.equal(a[c][k], b[c][k]) for c in a for k in a[c])

    together = run("together", strategy={"name": "flexlora"}, federation={"parallel_clients": 4})
    t = _all_final(together)
    assert max(float((a[c][k] - t[c][k]).abs().max()) for c in a for k in a[c]) < 1e-5

    private = run("dp", strategy={"name": "hetlora"}, privacy={"clip_norm": 0.05, "noise_multiplier": 1.0})
    assert [r["round"] for r in _records(private, "privacy") if "epsilon" in r] == [1, 2]
    assert [rank_of(s) for s in _all_final(private).values()] == [1, 2, 3, 4]


def test_trust_across_ranks_scores_every_peer_at_its_own_rank_and_mixes_the_products(corpus_dir, tmp_path):
    """Validation trust with clients of ranks 1-4: each client scores every peer's adapter (in a spare adapter
    of the peer's rank), and the aggregation is FlexLoRA's rule with the trust matrix: each client's B A is
    the best rank-r_i approximation of sum_j W_ij B_j A_j of the uploads."""
    from cotune.algorithms.personalized import TrustEvidence, aggregate
    from cotune.config.schema import StrategyConfig

    tree = tiny_tree(corpus_dir, tmp_path, lora={"ranks": [1, 2, 3, 4]}, strategy={"name": "validation"})
    (run_dir,) = run_experiment(config_from_dict(tree))
    trust = _records(run_dir, "trust")[-1]["matrix"]
    assert len({tuple(row) for row in trust}) > 1  # not uniform: peers were told apart
    assert [rank_of(s) for s, _ in _final(run_dir)] == [1, 2, 3, 4]

    g = torch.Generator().manual_seed(1)
    ups = [{A: torch.randn(r, 5, generator=g), B: torch.randn(6, r, generator=g)} for r in (1, 3)]
    evidence = TrustEvidence(2, mixtures=torch.tensor([[1.0, 0.0], [0.6, 0.4]]))
    w, mixed = aggregate(StrategyConfig(name="oracle"), ups, evidence)
    assert not torch.allclose(w[0], w[1])
    for i, r in enumerate((1, 3)):
        target = sum(w[i, j] * ups[j][B] @ ups[j][A] for j in range(2))
        u, s, vh = torch.linalg.svd(target)
        best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        torch.testing.assert_close(mixed[i][B] @ mixed[i][A], best, atol=1e-5, rtol=1e-5)
        assert rank_of(mixed[i]) == r


def test_a_peer_of_another_rank_is_scored_as_its_own_model_would_be(corpus_dir, tmp_path):
    """Client 0 (rank 1) scores the adapters of ranks 1-4 on its validation windows exactly as a model holding
    each one alone does; its own slot is left as it was."""
    from rich.console import Console

    from cotune.evaluation.lm import evaluate_lm
    from cotune.models.lora import AdapterPool
    from cotune.runtime.setup import load_windows, personalized_works

    tree = tiny_tree(corpus_dir, tmp_path, lora={"ranks": [1, 2, 3, 4]}, strategy={"name": "validation"})
    cfg = config_from_dict(tree)
    base, tokenizer, device = load_model(cfg)
    g = torch.Generator().manual_seed(3)
    pool = adapter_pool(cfg, base)
    peers = [
        {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in pool.state(n).items()} for n in pool.names
    ]
    works = personalized_works(cfg, pool, load_windows(cfg, tokenizer, Console(quiet=True)), device)
    own = works[0].adapter()
    row = works[0].peer_perplexity(peers, val_batches=2).ppl
    assert all(torch.equal(v, own[k]) for k, v in works[0].adapter().items())
    val = works[0].val
    base_alone, _, _ = load_model(cfg)
    for j, state in enumerate(peers):
        alone = AdapterPool(base_alone, cfg.lora, ["alone"], [rank_of(state)])
        alone.load_state("alone", state)
        alone.activate("alone")
        assert row[j] == pytest.approx(
            evaluate_lm(alone.model, val, cfg.train.eval_batch_size, 2).ppl, rel=1e-5
        )
        base_alone = alone.unload()
    assert len(set(row)) == 4
