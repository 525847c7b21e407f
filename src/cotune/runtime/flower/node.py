"""One data owner on Flower: the ClientWork a SuperNode runs for each message, and its state between them.

Flower runs each message in a fresh ClientApp process, so a node is rebuilt per message from the
config the message carries plus its node config (`partition-id`, `num-partitions`, `data-path`,
`public-path`, `state-dir`), and its adapter, trainer state (optimizer, schedule, data cursor) and
RNG are restored from and saved back to its `state-dir` (node_state.py). The work
itself is `ClientWork`, built by `runtime.setup` exactly as the in-process simulation builds it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml

from cotune.algorithms.fedcollm import check_payload
from cotune.config.loader import config_from_dict
from cotune.config.schema import ExperimentConfig
from cotune.data.client_examples import client_data, own_client_data, public_file
from cotune.data.corpora import load_documents
from cotune.data.task_data import EncodedSet, build_task_data, owned_set
from cotune.data.windows import ClientData, FederatedData, Rows, owner_source, pack_windows, tokenize
from cotune.runtime.client import ClientWork
from cotune.runtime.flower.node_state import NodeStateStore, default_state_dir
from cotune.runtime.setup import (
    LabelMixture,
    adapter_pool,
    decoding_of,
    fedcollm_work,
    load_model,
    personalized_work,
)
from cotune.seeds import stream_seed
from cotune.state import AdapterState


@dataclass(frozen=True)
class NodeSettings:
    """What a SuperNode's operator configures (`flower-supernode --node-config ...`)."""

    partition: int  # partition-id: which client of the config this node is
    num_partitions: int | None = None  # num-partitions: checked against federation.clients
    data_path: str | None = None  # data-path: this owner's own files (replaces data.path / data.sources)
    public_path: str | None = None  # public-path: the public reference files (the same on every node)
    state_dir: Path = field(default_factory=default_state_dir)  # state-dir: trainer states (resume)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        if "partition-id" not in node_config:
            raise ValueError(
                "this SuperNode has no partition-id: start it with "
                "--node-config 'partition-id=<i> num-partitions=<clients>'"
            )
        n = node_config.get("num-partitions")
        data, public = node_config.get("data-path"), node_config.get("public-path")
        state_dir = node_config.get("state-dir")
        return cls(
            partition=int(node_config["partition-id"]),
            num_partitions=int(n) if n is not None else None,
            data_path=str(data) if data else None,
            public_path=str(public) if public else None,
            state_dir=Path(str(state_dir)).expanduser() if state_dir else default_state_dir(),
        )


# The frozen base of this process, by model settings: a simulation actor (or any long-lived process)
# serves many messages and loads it once; each message wraps it in its adapter and unwraps it after.
BASES: dict[str, tuple[torch.nn.Module, Any, torch.device]] = {}


def base_model(cfg: ExperimentConfig) -> tuple[torch.nn.Module, Any, torch.device]:
    key = json.dumps([cfg.model.model_dump(mode="json"), cfg.device, cfg.run.threads], sort_keys=True)
    cached = BASES.get(key)
    if cached is None or any("lora_" in name for name, _ in cached[0].named_modules()):
        BASES.clear()  # one base at a time; one still wrapped (a Node never closed) is not reused
        BASES[key] = load_model(cfg)
    return BASES[key]


# The data this process prepared, by what it was built from: a simulation actor serves every virtual
# SuperNode's messages, and all of them split the same federation, so the corpus is read and tokenized
# once per actor instead of once per message (one entry per kind: the latest run's).
PREPARED: dict[str, tuple[str, Any]] = {}


def prepared(kind: str, key: Any, build: Callable[[], Any]) -> Any:
    text = json.dumps(key, sort_keys=True, default=str)
    hit = PREPARED.get(kind)
    if hit is None or hit[0] != text:
        PREPARED[kind] = (text, build())
    return PREPARED[kind][1]


def node_config(config_yaml: str, settings: NodeSettings) -> ExperimentConfig:
    """The experiment config as this node sees it: the server's config plus the node's own data path."""
    tree = yaml.safe_load(config_yaml) or {}
    for key in ("data_path", "public_path"):
        value = getattr(settings, key)
        if value and not Path(value).expanduser().exists():
            raise ValueError(f"{key.replace('_', '-')} {value!r} does not exist on this SuperNode")
    # personalized: the server's data paths need not exist here, this owner brings its own (the node
    # reads it from `settings.data_path`); with data.clients the node is one of those owners, as it is
    if settings.data_path and "data" in tree and not (tree["data"] or {}).get("clients"):
        tree["data"] = {**tree["data"], "path": settings.data_path}
    cfg = config_from_dict(tree, "(sent by the ServerApp)")
    clients = cfg.federation.clients
    if settings.num_partitions is not None and settings.num_partitions != clients:
        raise ValueError(
            f"this SuperNode has num-partitions={settings.num_partitions}, the config has "
            f"federation.clients={clients}"
        )
    if not 0 <= settings.partition < clients:
        raise ValueError(f"partition-id {settings.partition} is outside 0..{clients - 1}")
    return cfg


class Node:
    """A SuperNode of either family: its config, its base model with one adapter, its ClientWork."""

    def __init__(self, family: str, cfg: ExperimentConfig, settings: NodeSettings) -> None:
        self.family, self.cfg, self.settings = family, cfg, settings
        self.index = settings.partition
        base, self.tokenizer, self.device = base_model(cfg)
        self.pool = adapter_pool(cfg, base, [self.index])
        if family == "personalized":
            self.decoding = decoding_of(cfg, base, self.tokenizer)
            self.work = self.personalized_work()
        elif family == "fedcollm":
            self.work = fedcollm_work(
                cfg,
                self.index,
                self.pool,
                self.task_data,
                self.device,
                len(self.tokenizer),
                own_data=self.own_data,
            )
        else:
            raise ValueError(f"this cotune ClientApp does not implement the {family!r} family")
        self.shapes = {k: v.shape for k, v in self.work.adapter().items()}
        self.rng_restored = False

    # ---- data ------------------------------------------------------------------------------------------
    @property
    def own_data(self) -> bool:
        """Trains on files the server does not read (a data-path, or its task.clients file): its n_k is
        its own claim, not a part of a split the server can check."""
        task = self.cfg.task
        return bool(self.settings.data_path) or (task is not None and task.clients is not None)

    @cached_property
    def federated(self) -> FederatedData:
        """The config's federated split (the demo: every node builds it and keeps its own partition)."""
        cfg = self.cfg
        key = [
            cfg.data.model_dump(mode="json"),
            cfg.federation.clients,
            cfg.run.seed,
            cfg.model.model_dump(mode="json"),
        ]
        return prepared(
            "federated",
            key,
            lambda: client_data(cfg.data, cfg.federation.clients, self.tokenizer, cfg.run.seed),
        )

    @cached_property
    def windows(self) -> ClientData:
        if not self.settings.data_path:
            return self.federated.clients[self.index]
        # A real data owner: its own files, split as data.clients splits each owner's (the same function)
        return own_client_data(
            Path(self.settings.data_path), self.cfg.data, self.tokenizer, self.cfg.run.seed, self.index
        )

    def public(self) -> Rows:
        """The public reference set (prediction trust); the server checks it is the same on every node."""
        dcfg = self.cfg.data
        if self.settings.public_path and dcfg.kind == "generation":
            return public_file(dcfg, self.tokenizer, self.settings.public_path)
        if self.settings.public_path:
            docs = load_documents([owner_source(self.settings.public_path, dcfg)])
            eos = self.tokenizer.eos_token_id
            return pack_windows(tokenize(docs, self.tokenizer), dcfg.seq_len, eos, dcfg.public_windows)
        if self.settings.data_path:
            raise ValueError(
                "prediction trust on a node with its own data-path needs public-path: the same public "
                "reference files on every SuperNode"
            )
        return self.federated.public

    @cached_property
    def task_data(self) -> EncodedSet:
        """This client's private set D_k: its part of the config's task split, or its own JSONL task."""
        task = self.cfg.task
        assert task is not None
        if self.settings.data_path:
            return owned_set(task, self.tokenizer, Path(self.settings.data_path))
        if task.clients is not None:  # per-owner files: this node reads its own, never the others'
            return owned_set(task, self.tokenizer, Path(task.clients[self.index]))
        cfg = self.cfg
        key = [
            task.model_dump(mode="json"),
            cfg.federation.clients,
            cfg.run.seed,
            cfg.model.model_dump(mode="json"),
        ]
        split = prepared(
            "task", key, lambda: build_task_data(task, cfg.federation.clients, self.tokenizer, cfg.run.seed)
        )
        return split.clients[self.index]

    def personalized_work(self) -> ClientWork:
        data, own = self.windows, bool(self.settings.data_path)
        labels = LabelMixture.of_windows(data) if own else LabelMixture.of_split(self.federated, self.index)
        return personalized_work(
            self.cfg,
            self.index,
            self.pool,
            data,
            self.public,
            self.device,
            labels,
            own,
            decoding=self.decoding,
        )

    # ---- state between messages ---------------------------------------------------------------------
    def adopt(self, state: AdapterState) -> None:
        """The adapter a message brings; a FedCoLLM node accepts only the SLM adapter."""
        if self.family == "fedcollm":
            check_payload(state, self.shapes)
        self.work.adopt(state)

    def trainer_state(self) -> dict[str, Any]:
        return {**self.work.state_dict(), "rng": torch.get_rng_state()}

    def load_trainer_state(self, state: Mapping[str, Any]) -> None:
        self.work.load_state_dict(dict(state))
        torch.set_rng_state(state["rng"])
        self.rng_restored = True

    def close(self) -> None:
        """Unwrap the base model (it stays in BASES, clean, for the next message)."""
        self.pool.unload()

    def store(self, run_key: str) -> NodeStateStore:
        """This node's trainer states of one run, on its own disk (what a resumed run reloads)."""
        return NodeStateStore(self.settings.state_dir, run_key, self.index)

    def seed_if_new(self) -> None:
        """Before its first training: this node's own dropout stream (a SuperNode is its own process)."""
        if not self.rng_restored:
            torch.manual_seed(stream_seed("learner", self.cfg.run.seed, self.index))
            self.rng_restored = True

    def weight(self) -> int:
        """This client's FedAvg weight (SecAgg+): n_k, or 1 with federation.weighting uniform."""
        return len(self.task_data) if self.cfg.federation.weighting == "examples" else 1
