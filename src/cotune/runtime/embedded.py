"""The embedded backend's runtime: every client of a run simulated in this process (`InProcessClients`).

The variants of one `cotune run` (the main run and its `run.compare` entries) share one loaded base
model (or SLM/LLM pair) and one data split; each builds its family's loop (`runtime/compose.py`) on
its own adapter pool. The orchestrator (`runtime/experiment.py`) prepares the run directories and
calls this through the backend registry (`runtime/backends.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from cotune.config.schema import ExperimentConfig
from cotune.data.windows import FederatedData
from cotune.runtime.client import Decoding, EvalMemo
from cotune.runtime.compose import fedcollm_loop, personalized_loop
from cotune.runtime.inprocess import InProcessClients
from cotune.runtime.rundir import RunFiles
from cotune.runtime.setup import (
    adapter_pool,
    decoding_of,
    fedcollm_pools,
    fedcollm_works,
    load_fedcollm_models,
    load_model,
    load_task,
    load_windows,
    needs_llm,
    personalized_works,
)


def run_embedded(
    variants: list[ExperimentConfig],
    dirs: list[Path],
    console: Console,
    resume: Sequence[bool] | None = None,
) -> None:
    """The variants in this process, on one loaded base model (or pair) and one data split; `resume[i]`:
    variant i continues from its checkpoint (default: every variant starts)."""
    if not variants:
        return
    resumed = list(resume) if resume is not None else [False] * len(variants)
    if variants[0].is_cotuning:
        run_fedcollm_family(variants, dirs, console, resumed)
    else:
        run_personalized(variants, dirs, console, resumed)


def run_personalized(
    variants: list[ExperimentConfig], dirs: list[Path], console: Console, resume: Sequence[bool]
) -> None:
    cfg = variants[0]
    base, tokenizer, device = load_model(cfg, console=console)
    data = load_windows(cfg, tokenizer, console)
    decoding = decoding_of(cfg, base, tokenizer)
    memo: EvalMemo = {}  # one base model and one split: an adapter scored by one variant is not rescored
    for d, v, resumed in zip(dirs, variants, resume, strict=True):
        console.print(f"[bold]strategy {v.strategy.name}[/] -> {d}")
        base = run_personalized_variant(v, d, base, data, device, console, resumed, decoding, memo)


def run_personalized_variant(
    cfg: ExperimentConfig,
    run_dir: Path,
    base: torch.nn.Module,
    data: FederatedData,
    device: torch.device,
    console: Console,
    resume: bool = False,
    decoding: Decoding | None = None,
    memo: EvalMemo | None = None,
) -> torch.nn.Module:
    """One personalized run on a loaded base model and data split (generation data: its clients decode
    their test prompts with `decoding`; `memo`: evaluations kept across variants); gives the untouched
    base back."""
    pool = adapter_pool(cfg, base)
    clients = InProcessClients(cfg, personalized_works(cfg, pool, data, device, decoding, memo))
    try:
        dropped = {"documents": data.duplicate_documents, "examples": data.duplicates}
        personalized_loop(cfg, RunFiles(run_dir, cfg), pool, clients, console, dropped).run(resume)
    finally:
        base = pool.unload()
    return base


def run_fedcollm_family(
    variants: list[ExperimentConfig], dirs: list[Path], console: Console, resume: Sequence[bool]
) -> None:
    """FedCoLLM and its baselines: load the SLM (and the LLM once, if any variant needs it)."""
    cfg = variants[0]
    slm_base, llm_base, tokenizer, device, bridge = load_fedcollm_models(
        cfg, console, any(needs_llm(v) for v in variants)
    )
    task = load_task(cfg, tokenizer, console, bridge)
    eval_cache: dict = {}  # one base model per role and one test split: scores carry across variants
    for d, v, resumed in zip(dirs, variants, resume, strict=True):
        console.print(f"[bold]algorithm {v.algorithm}[/] -> {d}")
        slm, llm = fedcollm_pools(v, slm_base, llm_base)
        clients = InProcessClients(v, fedcollm_works(v, slm, task, device, len(tokenizer)))
        loop = fedcollm_loop(
            v, RunFiles(d, v), (slm, llm), task, tokenizer, device, clients, console, eval_cache, bridge
        )
        loop.run(resumed)
        slm_base = slm.unload()
        if llm is not None:
            llm_base = llm.unload()
