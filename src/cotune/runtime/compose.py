"""Each family's round loop, built once from its loaded models and a `Clients` port.

The embedded runtime (`runtime/embedded.py`: `InProcessClients`) and the Flower ServerApp
(`flower/server_app.py`: `FlowerClients`) build their loops here, so the two differ only in the port
they pass and in how many client slots their pool holds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from cotune.algorithms.fedcollm import plan_of
from cotune.config.schema import ExperimentConfig
from cotune.data.task_data import TaskData
from cotune.models.lora import AdapterPool
from cotune.models.vocab_map import TokenizerBridge
from cotune.runtime.fedcollm import EvalCache, FedCoLLMLoop
from cotune.runtime.personalized import PersonalizedLoop
from cotune.runtime.port import Clients
from cotune.runtime.rundir import RunFiles
from cotune.runtime.setup import fedcollm_server
from cotune.state import AdapterState


def has_client_step(cfg: ExperimentConfig) -> bool:
    """Whether the run has a client step (what a Flower backend sends to SuperNodes): every personalized
    strategy does; of the FedCoLLM family, the algorithms whose plan trains locally."""
    return not cfg.is_cotuning or plan_of(cfg.algorithm).local_training


def personalized_loop(
    cfg: ExperimentConfig,
    files: RunFiles,
    pool: AdapterPool,
    clients: Clients,
    console: Console,
    dropped: dict[str, int] | None = None,
) -> PersonalizedLoop:
    """The personalized loop: every client starts from the pool's initial adapter (its first slot's);
    `dropped`: the data's duplicates dropped before the split, for the start record."""
    slot = pool.names[0]

    def save(state: AdapterState, directory: Path) -> None:
        pool.save(slot, directory, state)

    return PersonalizedLoop(cfg, clients, pool.initial, save, files, console, pool.base_bytes(), dropped)


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
    bridge: TokenizerBridge | None = None,
) -> FedCoLLMLoop:
    """The FedCoLLM-family loop: the server's learners (theta; omega on the LLM pool, when the plan uses
    it) on `pools` (`setup.fedcollm_pools`), the clients behind `clients`; `bridge`: an LLM of another
    tokenizer (`setup.load_fedcollm_models`)."""
    slm, llm = pools
    server = fedcollm_server(cfg, slm, llm, task, tokenizer, device, bridge)
    return FedCoLLMLoop(cfg, clients, server, task, files, console, eval_cache)
