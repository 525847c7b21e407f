"""Multiple-choice scoring with several-token choices: the prompt run once with its KV cache kept (what
`score_requests` does for transformers models) against a forward per choice, side by side in one process.

French Wikipedia topic task (4 choices of several tokens each, the fedcollm-qwen-wiki-fr task), a fresh
LoRA adapter on the model, one torch thread; prints both wall times, their ratio, both accuracies and the
largest difference of any choice's log-likelihood.

    PYTHONPATH=src python bench/mc_shared_context.py [--model smollm2-135m-instruct] [--examples 32]
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import get_peft_model
from transformers import PreTrainedTokenizerBase

from cotune.config.schema import LoraSettings, ModelConfig, SourceConfig
from cotune.data.tasks import build_task
from cotune.evaluation import multiple_choice as mc
from cotune.models.loader import load_base_model
from cotune.models.lora import lora_config

LABELS = ["Arts et culture", "Géographie", "Histoire", "Science"]


def model_with_fresh_adapter(name: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The model as the FedCoLLM benchmarks score it (a fresh r-8 LoRA on q/v), on one torch thread."""
    torch.set_num_threads(1)
    model, tok = load_base_model(ModelConfig(name=name), torch.device("cpu"), torch.float32)
    lora = lora_config(LoraSettings(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    return get_peft_model(model, lora), tok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--examples", type=int, default=32)
    args = ap.parse_args()
    model, tok = model_with_fresh_adapter(args.model)
    source = SourceConfig(corpus="wikipedia", languages=["fr"], label_by="topic", labels=LABELS, max_docs=20)
    examples = build_task(source, max_chars=300)[: args.examples]
    t0 = time.perf_counter()
    shared = mc.evaluate_multiple_choice(model, tok, examples, batch_size=8, max_length=256)
    t_shared = time.perf_counter() - t0
    mc.keeps_kv_cache = lambda m: False  # the same scorer, one forward per choice
    t0 = time.perf_counter()
    alone = mc.evaluate_multiple_choice(model, tok, examples, batch_size=8, max_length=256)
    t_alone = time.perf_counter() - t0
    diff = max(
        abs(a - b)
        for ra, rb in zip(shared.logliks, alone.logliks, strict=True)
        for a, b in zip(ra, rb, strict=True)
    )
    print(
        f"{args.model}, {len(examples)} examples: shared prompt {t_shared:.1f} s (acc {shared.acc:.3f}), "
        f"a forward per choice {t_alone:.1f} s (acc {alone.acc:.3f}): {t_alone / t_shared:.2f}x; "
        f"max |d loglik| {diff:.1e}"
    )


if __name__ == "__main__":
    main()
