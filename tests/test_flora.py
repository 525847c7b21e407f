"""FLoRA (issue 16 item 3): stacked aggregation merged into every client's base, on every transport."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_tree

from cotune.algorithms.ranks import flora_stack, rank_of, rank_slice, resize_rank
from cotune.config import config_from_dict
from cotune.data.windows import federated_data
from cotune.evaluation.lm import evaluate_lm
from cotune.models.lora import AdapterPool
from cotune.runtime.checkpoint import list_checkpoints
from cotune.runtime.experiment import resume_experiment, run_experiment
from cotune.runtime.results import open_tuned
from cotune.runtime.setup import load_model

A, B = "m.lora_A.weight", "m.lora_B.weight"
T = torch.tensor
RANKS = [1, 2, 3, 4]


def test_flora_stack_by_hand():
    """Rank 1 with B A = diag(2, 0) and rank 2 with B A = diag(0, 4), weights 1/2: the stack has rank 3 and
    its product is diag(1, 2), the average of the products, with nothing cut; its slices are the parts."""
    c0 = {A: T([[2.0, 0.0]]), B: T([[1.0], [0.0]])}
    c1 = {A: T([[0.0, 4.0], [0.0, 0.0]]), B: T([[0.0, 0.0], [1.0, 0.0]])}
    stacked = flora_stack([c0, c1], [0.5, 0.5])
    assert rank_of(stacked) == 3
    assert torch.equal(stacked[B] @ stacked[A], T([[1.0, 0.0], [0.0, 2.0]]))
    one = rank_slice(stacked, 1, 3)
    assert torch.equal(one[A], c1[A]) and torch.equal(one[B], 0.5 * c1[B])
    assert torch.equal(flora_stack([rank_slice(stacked, 0, 1), one])[A], stacked[A])  # slices stack back
    assert c0[B].tolist() == [[1.0], [0.0]]  # inputs untouched


def _tiny(corpus_dir, tmp_path, **sections):
    return config_from_dict(tiny_tree(corpus_dir, tmp_path, **sections))


def test_a_merged_update_is_the_model_its_adapter_gives_and_unloads_clean(corpus_dir, tmp_path):
    """W0 + s B A in the base weights answers as the adapter (B, A) on W0 does; `unload` gives W0 back."""
    cfg = _tiny(corpus_dir, tmp_path)
    base, _, _ = load_model(cfg)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    pool = AdapterPool(base, cfg.lora, ["client-00"])
    update = {k: torch.randn(v.shape[0], v.shape[1]) for k, v in resize_rank(pool.initial, 3).items()}
    ids = torch.randint(0, 100, (2, 16))
    spare = pool.scratch(3)
    pool.load_state(spare, update)
    pool.activate(spare)
    as_adapter = pool.model(input_ids=ids).logits
    pool.activate("client-00")  # B = 0: the base alone
    pool.set_base_update(update)
    merged = pool.model(input_ids=ids).logits
    torch.testing.assert_close(merged, as_adapter, atol=1e-5, rtol=1e-5)
    pool.set_base_update(update)  # from W0 each time: merging twice is merging once
    assert torch.equal(pool.model(input_ids=ids).logits, merged)
    clean = pool.unload()
    assert all(torch.equal(v, before[k]) for k, v in clean.state_dict().items())


def _checkpoint(run_dir, round_=None):
    found = dict(list_checkpoints(run_dir))
    path = found[max(found) if round_ is None else round_]
    return {
        p.name: (
            load_file(str(p / "adapter_model.safetensors")),
            json.loads((p / "adapter_config.json").read_text()),
        )
        for p in sorted(path.glob("client-*"))
    }


def _records(run_dir, kind):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if f'"{kind}"' in x]


def _product(state):
    return {k: state[k.replace("lora_A", "lora_B")] @ state[k] for k in state if "lora_A" in k}


@pytest.mark.slow
def test_a_flora_run_merges_every_round_and_saves_each_client_as_one_adapter(corpus_dir, tmp_path):
    cfg = _tiny(
        corpus_dir, tmp_path, lora={"ranks": RANKS}, strategy={"name": "flora"}, run={"name": "flora"}
    )
    (run_dir,) = run_experiment(cfg)
    stacked = sum(RANKS)  # one round's update: every client's factors side by side
    for r in (0, 1, 2):
        saved = _checkpoint(run_dir, r)
        for (state, adapter_cfg), own in zip(saved.values(), RANKS, strict=True):
            # the merged history, then the client's fresh LoRA (B = 0), as one PEFT adapter
            assert rank_of(state) == r * stacked + own and adapter_cfg["r"] == r * stacked + own
            assert adapter_cfg["lora_alpha"] == pytest.approx(8 * (r * stacked + own) / 2)
            if r:
                assert all(
                    float(v[:, r * stacked :].abs().max()) == 0.0 for k, v in state.items() if "lora_B" in k
                )
        if r:  # one global model: every client's saved adapter is the same update
            products = [_product(s) for s, _ in saved.values()]
            assert all(torch.equal(p[k], products[0][k]) for p in products for k in p)
    trust = _records(run_dir, "trust")
    assert [m["matrix"] for m in trust] == [[[0.25] * 4] * 4] * 2
    comm = [c for c in _records(run_dir, "comm") if c["round"] == 1]
    unit = comm[0]["bytes_up"]  # one rank's worth of A and B
    assert [c["bytes_up"] for c in comm] == [unit * r for r in RANKS]
    # down: its LoRA to train and to evaluate, and the round's stacked update to merge
    assert [c["bytes_down"] for c in comm] == [2 * unit * r + unit * stacked for r in RANKS]

    # the saved adapter on the original base is the model the run evaluated
    tuned = open_tuned(run_dir, client=2)
    data = federated_data(cfg.data, cfg.federation.clients, tuned.tokenizer, cfg.run.seed)
    ppl = evaluate_lm(tuned.pool.model, data.clients[2].val, cfg.train.eval_batch_size).ppl
    logged = [e["ppl"] for e in _records(run_dir, "eval") if e["round"] == 2 and e["client"] == 2]
    assert logged and ppl == pytest.approx(logged[0], rel=1e-5)


@pytest.mark.slow
def test_flora_resumes_bit_exact_and_gives_the_base_back_to_the_next_variant(corpus_dir, tmp_path):
    def run(name, **sections):
        return run_experiment(
            _tiny(corpus_dir, tmp_path, run={"name": name, **sections.pop("run", {})}, **sections)
        )

    whole = run("whole", strategy={"name": "flora"})[0]
    cut = run("cut", strategy={"name": "flora"})[0]
    shutil.rmtree(cut / "checkpoints" / "round-0002")
    resume_experiment(cut)  # a fresh process would merge the checkpoint's history into a clean base
    a, b = _checkpoint(whole), _checkpoint(cut)
    assert all(torch.equal(a[c][0][k], b[c][0][k]) for c in a for k in a[c][0])

    # run.compare reuses the base model: FLoRA's merges are taken out before the next variant runs
    _, after = run("cmp", strategy={"name": "flora"}, run={"compare": ["fedavg"]})
    (alone,) = run("alone", strategy={"name": "fedavg"})
    x, y = _checkpoint(after), _checkpoint(alone)
    assert all(torch.equal(x[c][0][k], y[c][0][k]) for c in x for k in x[c][0])
