"""Vectorized clients (federation.parallel_clients): shared forward/backward, the same results as alone."""

from __future__ import annotations

import pytest
import torch

from cotune.config import ConfigError, config_from_dict
from cotune.config.schema import LoraSettings, TinyModelConfig, TrainConfig
from cotune.data.task_data import EncodedSet
from cotune.evaluation.lm import evaluate_lm, evaluate_lm_through
from cotune.models.lora import AdapterPool
from cotune.models.tiny import build_tiny_model, byte_tokenizer
from cotune.training.learner import Learner
from cotune.training.together import NotVectorizable, mixed_batch, train_together

NAMES = ["c0", "c1", "c2"]


def _pool(dropout: float = 0.0, attention_dropout: float = 0.0) -> AdapterPool:
    base = build_tiny_model(TinyModelConfig(), len(byte_tokenizer()))
    base.config.attention_dropout = attention_dropout
    settings = LoraSettings(r=2, alpha=8, dropout=dropout, target_modules=["q_proj", "v_proj"])
    pool = AdapterPool(base, settings, NAMES)
    g = torch.Generator().manual_seed(1)
    for name in NAMES:  # distinct non-zero adapters, so each client's own adapter really matters
        pool.load_state(
            name, {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in pool.state(name).items()}
        )
    return pool


def _windows() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 250, (20, 16), generator=g) for _ in NAMES]


def _answers() -> list[EncodedSet]:
    """Prompt/answer sets of different padded widths per client (labels -100 off the answer)."""
    g = torch.Generator().manual_seed(3)
    sets = []
    for width in (10, 14, 7):
        ids = torch.randint(0, 250, (12, width), generator=g)
        lengths = torch.randint(3, width + 1, (12,), generator=g)
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        labels = torch.where(torch.arange(width)[None] >= lengths[:, None] - 2, ids, -100)
        labels = torch.where(mask.bool(), labels, -100)
        sets.append(EncodedSet(input_ids=ids * mask, attention_mask=mask, labels=labels))
    return sets


def _learners(pool: AdapterPool, data: list, grad_accum: int) -> list[Learner]:
    cfg = TrainConfig(lr=1e-2, batch_size=2, grad_accum=grad_accum, max_grad_norm=0.5)
    return [
        Learner(pool, n, d, cfg, 10, 7 + i, "cpu") for i, (n, d) in enumerate(zip(NAMES, data, strict=True))
    ]


@pytest.mark.parametrize("kind", ["windows", "answers"])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_training_together_ends_where_training_alone_does(kind, grad_accum):
    """Each client's own optimizer, schedule, clipping and cursor; uneven step counts; the final adapters,
    the losses and the next batch each cursor draws match training one after another."""
    steps = [3, 3, 2]
    data = _windows() if kind == "windows" else _answers()
    alone_pool = _pool()
    alone = _learners(alone_pool, data, grad_accum)
    alone_losses = [learner.train(n).losses for learner, n in zip(alone, steps, strict=True)]
    pool = _pool()
    together = _learners(pool, data, grad_accum)
    seen: list[tuple[int, float]] = []
    callbacks = [lambda loss, k=k: seen.append((k, loss)) for k in range(3)]
    logs = train_together(together, steps, callbacks)
    for name, a, b in zip(NAMES, alone, together, strict=True):
        before, after = alone_pool.state(name), pool.state(name)
        assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-5
        assert a.lr == b.lr and a.sampler.state_dict() == b.sampler.state_dict()
    for log, losses in zip(logs, alone_losses, strict=True):
        assert log.losses == pytest.approx(losses, abs=1e-5)
    assert sorted(k for k, _ in seen) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert all(p.requires_grad == (n == pool.active) for n in NAMES for p in pool.parameters(n))


def test_mixed_batch_pads_without_labels_and_keeps_each_clients_rows():
    answers = _answers()
    parts = [answers[0].batch(torch.arange(2), torch.device("cpu")), torch.zeros(3, 5, dtype=torch.long)]
    batch, rows = mixed_batch(parts)
    assert rows == [slice(0, 2), slice(2, 5)]
    width = batch["input_ids"].shape[1]
    assert width == max(parts[0]["input_ids"].shape[1], 5)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["labels"][2:, :5] == 0).all()  # windows: every token is a target


def test_dropout_anywhere_is_refused():
    for pool in (_pool(dropout=0.1), _pool(attention_dropout=0.1)):
        learners = _learners(pool, _windows(), 1)
        with pytest.raises(NotVectorizable, match="parallel_clients: 1"):
            train_together(learners, [1, 1, 1])


def _tree(**federation) -> dict:
    return {
        "model": {"name": "tiny", "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2}},
        "lora": {"r": 2, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "federation": {"clients": 4, "rounds": 1, "local_steps": 1, "warmup_steps": 0, **federation},
        "strategy": {"name": "fedavg"},
        "device": "cpu",
    }


def test_config_refuses_what_shared_steps_cannot_honour():
    assert config_from_dict(_tree(parallel_clients=4)).federation.parallel_clients == 4
    dropout = _tree(parallel_clients=2)
    dropout["lora"]["dropout"] = 0.05
    with pytest.raises(ConfigError, match=r"lora\.dropout"):
        config_from_dict(dropout)
    with pytest.raises(ConfigError, match="client_timeout"):
        config_from_dict(_tree(parallel_clients=2, client_timeout=5))
    faults = {**_tree(parallel_clients=2), "simulation": {"faults": [{"client": 1, "kind": "error"}]}}
    with pytest.raises(ConfigError, match=r"simulation\.faults"):
        config_from_dict(faults)


def test_a_benchmark_shaped_tiny_model_with_grouped_query_attention_and_a_big_vocabulary():
    """model.tiny.num_kv_heads / vocab_size (what bench/client_scaling.py uses for a SmolLM2-shaped model)."""
    cfg = TinyModelConfig(hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64, vocab_size=1000)
    model = build_tiny_model(cfg, len(byte_tokenizer()))
    assert model.config.num_key_value_heads == 2 and model.get_input_embeddings().num_embeddings == 1000
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_model(TinyModelConfig(vocab_size=100), len(byte_tokenizer()))


def test_peers_scored_together_give_the_figures_of_one_by_one():
    """Validation trust with parallel_clients > 1: each row of the mixed batch through its own adapter."""
    pool = _pool()
    windows = _windows()[0]
    alone = []
    for name in NAMES:
        pool.activate(name)
        alone.append(evaluate_lm(pool.model, windows, 8, max_batches=2))
    with pool.lanes_for(NAMES) as lanes:
        together = evaluate_lm_through(pool.model, windows, 8, lanes, max_batches=2)
    assert len({round(r.ppl, 3) for r in alone}) == len(NAMES)  # distinct adapters: routing is visible
    for a, t in zip(alone, together, strict=True):
        assert t.tokens == a.tokens == 2 * 8 * 15
        assert t.ppl == pytest.approx(a.ppl, rel=1e-5) and t.acc == pytest.approx(a.acc, abs=1e-9)
    with pool.lanes_for(NAMES[::-1]) as lanes:
        backwards = evaluate_lm_through(pool.model, windows, 8, lanes, max_batches=2)
    assert [r.ppl for r in backwards] == pytest.approx([r.ppl for r in together][::-1], rel=1e-5)
