"""Batched greedy decoding on the real SmolLM2-135M-Instruct (fp32, CPU) gives exactly the tokens of
one-by-one `model.generate(do_sample=False)`, through the chat template, with prompts of different
lengths, on the base model and through an `AdapterPool` view with a non-zero adapter."""

from __future__ import annotations

import pytest
import torch

from cotune.config.loader import config_from_dict
from cotune.config.schema import ModelConfig
from cotune.evaluation.generation import greedy_decode, pad_token_id, stop_token_ids
from cotune.models.loader import load_base_model
from cotune.models.lora import AdapterPool
from cotune.runtime.results import prompt_ids

pytestmark = pytest.mark.integration

PROMPTS = [
    "Write a headline for this article:\n\nThe central bank raised interest rates by a quarter point on "
    "Thursday, citing persistent inflation in services and a tight labour market.",
    "What is the capital of France?",
    "Write a headline for this article:\n\nThe striker scored twice in the second half as the home side came "
    "from behind to win the cup final, sending thousands of supporters into the streets to celebrate late "
    "into the night, while the visiting manager said his team had simply run out of energy.",
    "Say hello.",
    "List three primary colours.",
]


def one_by_one(model, prompts, max_new_tokens, stops, pad):
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=pad,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        new = out[0, len(p) :].tolist()
        outs.append(new[: next((i for i, t in enumerate(new) if t in stops), len(new))])
    return outs


def test_batched_decoding_equals_generate_on_smollm2():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model, tok = load_base_model(
        ModelConfig(name="smollm2-135m-instruct"), torch.device("cpu"), torch.float32
    )
    prompts = [prompt_ids(tok, p) for p in PROMPTS]
    stops, pad = stop_token_ids(model, tok), pad_token_id(tok)
    expected = one_by_one(model, prompts, 24, stops, pad)
    assert any(len(e) < 24 for e in expected)  # a row that stops early
    assert len({len(p) for p in prompts}) == len(prompts)
    got = greedy_decode(model, prompts, batch_size=8, max_new_tokens=24, stop_ids=stops, pad_id=pad)
    assert got == expected

    cfg = config_from_dict({"model": {"name": "tiny"}, "lora": {"dropout": 0.0}})
    pool = AdapterPool(model, cfg.lora, ["c0"])
    gen = torch.Generator().manual_seed(0)
    pool.load_state(
        "c0", {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in pool.state("c0").items()}
    )
    pool.activate("c0")
    expected = one_by_one(pool.model, prompts[:3], 12, stops, pad)
    assert greedy_decode(
        pool.model, prompts[:3], batch_size=3, max_new_tokens=12, stop_ids=stops, pad_id=pad
    ) == (expected)
