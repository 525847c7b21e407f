"""Each family's round loop, built once from its loaded models and a `Clients` port.

The embedded runtime (`runtime/embedded.py`: `InProcessClients`) and the Flower ServerApp
(`flower/server_app.py`: `FlowerClients`) build their loops here, so the two differ only in the port
they pass and in how many client slots their pool holds.
"""

from __future__ import annotations

import torch
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from cotune.algorithms.fedcollm import plan_of
from cotune.config.schema import ExperimentConfig
from cotune.data.task_data import TaskData
from cotune.models.lora import AdapterPool
from cotune.runtime.fedcollm import EvalCache, FedCoLLMLoop
from cotune.runtime.personalized import PersonalizedLoop
from cotune.runtime.port import Clients
from cotune.runtime.rundir import RunFiles
from cotune.runtime.setup import fedcollm_server


def has_client_step(cfg: ExperimentConfig) -> bool:
    """Whether the run has a client step (what a Flower backend sends to SuperNodes): every personalized
    strategy does; of the FedCoLLM family, the algorithms whose plan trains locally."""
    return not cfg.is_cotuning or plan_of(cfg.algorithm).local_training


def personalized_loop(
    cfg: ExperimentConfig, files: RunFiles, pool: AdapterPool, clients: Clients, console: Console
) -> PersonalizedLoop:
    """The personalized loop: every client starts from the pool's initial adapter (its first slot's)."""
    slot = pool.names[0]
    return PersonalizedLoop(
        cfg, clients, pool.initial, lambda s, d: pool.save(slot, d, s), files, console, pool.base_bytes()
    )


def fedcollm_loop(
    cfg: ExperimentConfig,
    files: RunFiles,
    pools: tuple[AdapterPool, AdapterPool | None],
    task: TaskData,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    clients: Clients,
    console: Console,
    eval_cache: EvalCache | None = None,
) -> FedCoLLMLoop:
    """The FedCoLLM-family loop: the server's learners (theta; omega on the LLM pool, when the plan uses
    it) on `pools` (`setup.fedcollm_pools`), the clients behind `clients`."""
    slm, llm = pools
    server = fedcollm_server(cfg, slm, llm, task, tokenizer, device)
    return FedCoLLMLoop(cfg, clients, server, task, files, console, eval_cache)
