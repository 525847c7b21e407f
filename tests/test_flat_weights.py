"""A client's LoRA weights live back to back in one flat parameter; training it must be training peft's own
parameters one by one: same gradients, same clipping, same AdamW, to the bit."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from cotune.config import config_from_dict
from cotune.models.lora import AdapterPool, lora_config
from cotune.models.tiny import build_tiny_model, byte_tokenizer
from cotune.training.learner import Learner, one_parameter_state
from cotune.training.loop import make_optimizer, make_scheduler, train_step

STEPS = 4


def _setup(frozen: tuple[str, ...] = ()):
    # max_grad_norm far below the gradients' norm: every step clips, so the norm must agree to the bit
    cfg = config_from_dict(
        {"model": {"name": "tiny"}, "lora": {"dropout": 0.0}, "train": {"max_grad_norm": 1e-3}}
    )
    torch.manual_seed(0)
    base = build_tiny_model(cfg.model.tiny, len(byte_tokenizer()))
    plain = get_peft_model(copy.deepcopy(base), lora_config(cfg.lora))
    pool = AdapterPool(base, cfg.lora, ["c0", "c1"])
    set_peft_model_state_dict(plain, pool.state("c1"))
    for name, param in plain.named_parameters():
        param.requires_grad_("lora_" in name and not any(part in name for part in frozen))
    batches = [
        torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(STEPS)
    ]
    return cfg, pool, plain, batches


def _plain_steps(cfg, plain, batches, optimizer=None):
    params = [p for p in plain.parameters() if p.requires_grad]
    optimizer = optimizer or make_optimizer(params, cfg.train)
    scheduler = make_scheduler(optimizer, STEPS, cfg.train)
    for ids in batches:
        plain.train()
        plain(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def _same(pool, name, plain) -> bool:
    theirs = get_peft_model_state_dict(plain)
    mine = pool.state(name)
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("frozen", [(), ("lora_A",)])
def test_a_flat_parameter_trains_exactly_like_pefts_parameters(frozen):
    cfg, pool, plain, batches = _setup(frozen)
    before = pool.state("c1")
    trained, cold = pool.split_parameters("c1", frozen)
    assert len(cold) == len(frozen)
    optimizer = make_optimizer([trained], cfg.train)
    scheduler = make_scheduler(optimizer, STEPS, cfg.train)
    pool.activate("c1")
    for param in cold:
        param.requires_grad_(False)
    for ids in batches:
        train_step(pool.model, [ids], optimizer, scheduler, cfg.train.max_grad_norm)
    _plain_steps(cfg, plain, batches)
    assert _same(pool, "c1", plain)
    after = pool.state("c1")
    assert all(torch.equal(after[k], before[k]) == any(p in k for p in frozen) for k in after)
    assert len(optimizer.state) == 1  # one set of moments per client, not one per weight


def test_a_learner_resumes_from_an_optimizer_state_saved_per_weight():
    """Checkpoints written before flat weights hold one AdamW state per LoRA weight; a learner joins them
    and goes on exactly as the per-weight optimizer would."""
    cfg, pool, plain, batches = _setup()
    saved = _plain_steps(cfg, plain, batches[:2])
    per_weight = copy.deepcopy(saved.state_dict())
    assert len(per_weight["state"]) > 1
    pool.load_state("c1", get_peft_model_state_dict(plain))
    learner = Learner(pool, "c1", torch.randint(0, 200, (8, 16)), cfg.train, STEPS, 0, "cpu")
    learner.optimizer.load_state_dict(one_parameter_state(per_weight))
    scheduler = make_scheduler(learner.optimizer, STEPS, cfg.train)
    pool.activate("c1")
    for ids in batches[2:]:
        train_step(pool.model, [ids], learner.optimizer, scheduler, cfg.train.max_grad_norm)
    _plain_steps(cfg, plain, batches[2:], optimizer=saved)
    assert _same(pool, "c1", plain)


def test_a_learner_refuses_an_optimizer_state_of_another_adapter():
    cfg, pool, _, _ = _setup()
    learner = Learner(pool, "c1", torch.randint(0, 200, (8, 16)), cfg.train, STEPS, 0, "cpu")
    state = learner.state_dict()
    state["optimizer"]["state"] = {
        0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}
    }
    with pytest.raises(ValueError, match="another size"):
        learner.load_state_dict(state)


def test_freezing_every_weight_is_refused():
    _, pool, _, _ = _setup()
    with pytest.raises(ValueError, match="nothing to train"):
        pool.split_parameters("c1", ("lora_",))
