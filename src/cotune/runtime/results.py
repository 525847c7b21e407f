"""Using what a run produced: generate with an adapter, score it on a task file, export it.

An adapter is named as in the run's checkpoints: a client's (`client-KK`, both families),
FedCoLLM's server SLM adapter theta (`server`) or the server LLM's omega (`server-llm`). It is
loaded from the newest intact checkpoint onto the base model its config names, so a run directory
is all a user needs (plus the offline model assets).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from cotune.algorithms.ranks import rank_of
from cotune.config.loader import load_config
from cotune.config.schema import ExperimentConfig
from cotune.data.tasks import load_task_file
from cotune.evaluation.multiple_choice import MCResult, evaluate_multiple_choice
from cotune.models.adapter_check import AdapterSpec, check_adapter
from cotune.models.lora import AdapterPool
from cotune.runtime.fedcollm import LLM_ADAPTER, SERVER
from cotune.runtime.rundir import ResumeError, client_name, load_adapter, newest_intact
from cotune.runtime.setup import load_model


@dataclass
class TunedModel:
    """A base model with one of the run's adapters active."""

    pool: AdapterPool
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    cfg: ExperimentConfig
    adapter_dir: Path  # the adapter in PEFT format, in the checkpoint it was read from


def adapter_name(cfg: ExperimentConfig, client: int | None, server: bool, llm: bool) -> str:
    """Which adapter `--client K` / `--server` / `--llm` names in this run (refused when it has none)."""
    if sum([client is not None, server, llm]) > 1:
        raise ValueError("name one adapter: --client K, --server or --llm")
    if client is not None:
        if not 0 <= client < cfg.federation.clients:
            raise ValueError(f"--client {client}: this run has clients 0..{cfg.federation.clients - 1}")
        return client_name(client)
    if not cfg.is_cotuning:
        raise ValueError("a personalized run has one adapter per client: choose it with --client K")
    if llm:
        if cfg.llm is None:
            raise ValueError("this run has no server LLM (no llm section)")
        return LLM_ADAPTER
    return SERVER


def open_tuned(
    run_dir: Path,
    client: int | None = None,
    server: bool = False,
    llm: bool = False,
    console: Console | None = None,
) -> TunedModel:
    """The base model with the named adapter of the run's newest intact checkpoint."""
    if not (run_dir / "config.yaml").is_file():
        raise ResumeError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    name = adapter_name(cfg, client, server, llm)
    found = newest_intact(run_dir)
    if found is None or found[0] < 0:
        raise ResumeError(f"{run_dir} has no intact checkpoint to take the adapter from")
    adapter_dir = found[1] / name
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ResumeError(f"{run_dir}: its checkpoint round {found[0]} holds no adapter {name!r}")
    model_cfg, lora = (
        (cfg.llm.model, cfg.llm.lora) if name == LLM_ADAPTER and cfg.llm else (cfg.model, cfg.lora)
    )
    state, file = load_adapter(adapter_dir), adapter_dir / "adapter_model.safetensors"
    check_adapter(file, state)  # what needs no model, before it loads
    base, tokenizer, device = load_model(cfg, model_cfg, console)
    pool = AdapterPool(base, lora, [name], [rank_of(state)])  # clients may differ in rank (lora.ranks)
    check_adapter(file, state, AdapterSpec.of(pool.view(name)))
    pool.load_state(name, {k: v.to(device) for k, v in state.items()})
    pool.activate(name)
    pool.model.eval()
    return TunedModel(pool, tokenizer, device, cfg, adapter_dir)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt as the model expects it: through its chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        return list(ids)
    return list(tokenizer.encode(prompt))


@torch.no_grad()
def generate(tuned: TunedModel, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy continuation of `prompt` (reproducible: no sampling)."""
    ids = torch.tensor([prompt_ids(tuned.tokenizer, prompt)], device=tuned.device)
    out = tuned.pool.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tuned.tokenizer.pad_token_id,
    )
    return str(tuned.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def evaluate_task(tuned: TunedModel, task_file: Path, batch_size: int = 8, max_length: int = 512) -> MCResult:
    """Multiple-choice accuracy of the adapter on the user's JSONL task file."""
    examples = load_task_file(task_file)
    return evaluate_multiple_choice(
        tuned.pool.model, tuned.tokenizer, examples, batch_size=batch_size, max_length=max_length
    )


def export(tuned: TunedModel, out: Path, merge: bool = False) -> Path:
    """The adapter in PEFT format, or (`merge`) a standalone model directory with the adapter folded
    into the weights, which `AutoModelForCausalLM.from_pretrained(out)` loads offline. Never over an
    existing directory that has content."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: choose another output directory")
    if not merge:
        shutil.copytree(tuned.adapter_dir, out, dirs_exist_ok=True)
        return out
    merged = tuned.pool.model.merge_and_unload()
    merged.save_pretrained(out)
    tuned.tokenizer.save_pretrained(out)
    return out
