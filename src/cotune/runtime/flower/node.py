"""One data owner's side of personalized fine-tuning: what a SuperNode computes for each message.

This is the embedded runtime's per-client work (PersonalizedRuntime.train_round / peer_perplexity /
prediction_distance / evaluate) for a single client, built from the same pieces: `train_windows`,
`evaluate_lm`, `make_optimizer`, `make_scheduler`, `WindowSampler`, `AdapterPool`. It has no Flower
dependency: the ClientApp decodes a message, calls one method, and encodes the answer, so the same
class can serve any transport.

A node's whole training state (adapter, AdamW moments, LR schedule, data cursor, RNG) is saved to and
restored from a dict of tensors + a JSON-able tree after every message, because Flower runs each
message in a fresh ClientApp process and keeps only `Context.state` between them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml

from cotune.algorithms.fedcollm import check_payload
from cotune.config.loader import config_from_dict
from cotune.config.schema import DataConfig, ExperimentConfig, SourceConfig
from cotune.data.corpora import load_documents
from cotune.data.task_data import EncodedSet, build_task_data, encode
from cotune.data.tasks import build_task
from cotune.data.windows import (
    ClientData,
    FederatedData,
    WindowSampler,
    build_federated_data,
    pack_windows,
    tokenize,
)
from cotune.evaluation.lm import evaluate_lm
from cotune.models.loader import load_base_model, resolve_device, resolve_dtype
from cotune.models.lora import AdapterPool, AdapterState
from cotune.runtime.cotuning import CoTuningRuntime
from cotune.runtime.embedded import client_name
from cotune.runtime.experiment import seed_everything
from cotune.training.loop import make_optimizer, make_scheduler, train_windows


@dataclass(frozen=True)
class NodeSettings:
    """What a SuperNode's operator configures (`flower-supernode --node-config ...`)."""

    partition: int  # partition-id: which client of the config this node is
    num_partitions: int | None = None  # num-partitions: checked against federation.clients
    data_path: str | None = None  # data-path: this owner's own files (replaces data.path / data.sources)
    public_path: str | None = None  # public-path: the public reference files (the same on every node)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        if "partition-id" not in node_config:
            raise ValueError(
                "this SuperNode has no partition-id: start it with "
                "--node-config 'partition-id=<i> num-partitions=<clients>'"
            )
        n = node_config.get("num-partitions")
        data, public = node_config.get("data-path"), node_config.get("public-path")
        return cls(
            partition=int(node_config["partition-id"]),  # type: ignore[arg-type]
            num_partitions=int(n) if n is not None else None,  # type: ignore[arg-type]
            data_path=str(data) if data else None,
            public_path=str(public) if public else None,
        )


def node_config(config_yaml: str, settings: NodeSettings) -> ExperimentConfig:
    """The experiment config as this node sees it: the server's config plus the node's own data path."""
    tree = yaml.safe_load(config_yaml) or {}
    for key in ("data_path", "public_path"):
        value = getattr(settings, key)
        if value and not Path(value).expanduser().exists():
            raise ValueError(f"{key.replace('_', '-')} {value!r} does not exist on this SuperNode")
    if settings.data_path:  # the server's data paths need not exist here: this owner brings its own
        tree["data"] = {**tree.get("data", {}), "path": settings.data_path}
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


class _Node:
    """What every SuperNode holds: its config, its partition, the base model and its one adapter."""

    def __init__(self, cfg: ExperimentConfig, settings: NodeSettings) -> None:
        self.cfg, self.settings = cfg, settings
        self.index = settings.partition
        self.name = client_name(self.index)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        seed_everything(cfg.run.seed)
        self.device = resolve_device(cfg.device)
        base, self.tokenizer = load_base_model(
            cfg.model, self.device, resolve_dtype(cfg.model.dtype, self.device)
        )
        self.pool = AdapterPool(base, cfg.lora, [self.name])


class PersonalizedNode(_Node):
    """A client of personalized fine-tuning: its adapter, optimizer + schedule, data cursor and data."""

    def __init__(self, cfg: ExperimentConfig, settings: NodeSettings) -> None:
        super().__init__(cfg, settings)
        self.optimizer = make_optimizer(self.pool.parameters(self.name), cfg.train)
        self.scheduler = make_scheduler(self.optimizer, cfg.federation.total_steps, cfg.train)
        self._sampler: WindowSampler | None = None
        self._rng_restored = False

    # ---- data ------------------------------------------------------------------------------------
    @cached_property
    def federated(self) -> FederatedData:
        """The config's federated split (the demo: every node builds it and keeps its own partition)."""
        return build_federated_data(
            self.cfg.data, self.cfg.federation.clients, self.tokenizer, self.cfg.run.seed
        )

    @cached_property
    def data(self) -> ClientData:
        if not self.settings.data_path:
            return self.federated.clients[self.index]
        # A real data owner: train/validation windows from its own files, split the same way.
        own = DataConfig.model_validate(
            {**self.cfg.data.model_dump(), "public_windows": 0, "partition": {"kind": "iid"}}
        )
        return build_federated_data(own, 1, self.tokenizer, self.cfg.run.seed).clients[0]

    @cached_property
    def public(self) -> torch.Tensor:
        """The public reference set (prediction trust); the server checks it is the same on every node."""
        dcfg = self.cfg.data
        if self.settings.public_path:
            docs = load_documents([SourceConfig(corpus="files", path=Path(self.settings.public_path))])
            eos = self.tokenizer.eos_token_id
            return pack_windows(tokenize(docs, self.tokenizer), dcfg.seq_len, eos, dcfg.public_windows)
        if self.settings.data_path:
            raise ValueError(
                "prediction trust on a node with its own data-path needs public-path: the same public "
                "reference files on every SuperNode"
            )
        return self.federated.public

    @property
    def sampler(self) -> WindowSampler:
        if self._sampler is None:
            tcfg = self.cfg.train
            self._sampler = WindowSampler(
                len(self.data.train), tcfg.batch_size * tcfg.grad_accum, self.cfg.run.seed * 1000 + self.index
            )
        return self._sampler

    # ---- state between messages ----------------------------------------------------------------------
    def adapter(self) -> AdapterState:
        return {k: v.cpu() for k, v in self.pool.state(self.name).items()}

    def set_adapter(self, state: Mapping[str, torch.Tensor]) -> None:
        """In place, like the embedded runtime's load_state: the optimizer keeps its parameters."""
        self.pool.load_state(self.name, {k: v.to(self.device) for k, v in state.items()})

    def trainer_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def load_trainer_state(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"])
        self._rng_restored = True

    # ---- the work ---------------------------------------------------------------------------------
    def train(self, steps: int) -> dict[str, float]:
        """`steps` optimizer steps on local data: the body of the embedded runtime's train_round."""
        if not self._rng_restored:  # first round: this node's own dropout stream
            torch.manual_seed(self.cfg.run.seed * 1000 + self.index)
            self._rng_restored = True
        self.pool.activate(self.name)
        losses, tokens, dt = train_windows(
            self.pool.model,
            self.data.train,
            self.sampler.next_indices,
            steps,
            self.optimizer,
            self.scheduler,
            self.cfg.train,
            self.device,
        )
        return {
            "loss": sum(losses) / len(losses),
            "last_loss": losses[-1],
            "lr": float(self.scheduler.get_last_lr()[0]),
            "tokens_per_s": tokens / dt if dt else 0.0,
            "steps": float(steps),
        }

    def evaluate(self) -> dict[str, float]:
        self.pool.activate(self.name)
        res = evaluate_lm(self.pool.model, self.data.val, self.cfg.train.eval_batch_size)
        return {k: float(v) for k, v in res.as_dict().items()}

    def peer_perplexity(
        self, adapters: Sequence[Mapping[str, torch.Tensor]], val_batches: int
    ) -> list[float]:
        """This node's row of P: perplexity of each given adapter on this node's validation windows."""
        own = self.adapter()
        row = []
        for state in adapters:
            self.set_adapter(state)
            res = evaluate_lm(self.pool.model, self.data.val, self.cfg.train.eval_batch_size, val_batches)
            row.append(res.ppl)
        self.set_adapter(own)
        return row

    @torch.no_grad()
    def predict(
        self, public_batches: int, batch_size: int, k: int
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """Top-k logits of this node's adapter on the public batches the embedded runtime uses, and V."""
        public = self.public
        if len(public) == 0:
            raise ValueError("prediction trust needs a public reference set: set data.public_windows > 0")
        self.pool.activate(self.name)
        self.pool.model.eval()
        out, vocab = [], 0
        for b in range(min(public_batches, math.ceil(len(public) / batch_size))):
            ids = public[b * batch_size : (b + 1) * batch_size].to(self.device)
            logits = self.pool.model(input_ids=ids).logits.float()
            vocab = logits.shape[-1]
            values, indices = logits.topk(min(k, vocab), dim=-1)
            out.append((values.cpu(), indices.cpu()))
        return out, vocab

    def describe(self) -> dict[str, Any]:
        """What the server needs to know about this node before round 1 (and the oracle's mixture)."""
        data = self.data
        if self.settings.data_path:
            labels = sorted(data.label_counts)
            total = sum(data.label_counts.values())
            mixture = [data.label_counts[n] / total for n in labels]
        else:
            labels = list(self.federated.label_names)
            mixture = [float(x) for x in self.federated.mixtures[self.index]]
        return {
            "partition": self.index,
            "train_windows": len(data.train),
            "val_windows": len(data.val),
            "label_names": labels,
            "mixture": mixture,
            "device": str(self.device),
        }


class FedCoLLMNode(_Node):
    """A client of FedCoLLM (and its fedavg / standalone baselines): only the SLM, its LoRA and its shard.

    The LLM and its LoRA never exist here. Local training is the embedded runtime's own code: the
    methods below are CoTuningRuntime's (learner construction, step budget, batches, train loop),
    so a SuperNode trains exactly as the embedded runtime trains this client.
    """

    _learner = CoTuningRuntime._learner
    local_steps = CoTuningRuntime.local_steps
    next_batches = CoTuningRuntime.next_batches
    train_learner = CoTuningRuntime.train_learner

    def __init__(self, cfg: ExperimentConfig, settings: NodeSettings) -> None:
        super().__init__(cfg, settings)
        self.shapes = {k: v.shape for k, v in self.pool.state(self.name).items()}
        steps = self.local_steps(len(self.data)) * cfg.federation.rounds
        seed = cfg.run.seed * 1000 + self.index
        self.learner = self._learner(self.pool, self.name, self.data, steps, cfg.train.lr, seed)
        self._rng_restored = False

    @cached_property
    def data(self) -> EncodedSet:
        """This client's private set D_k: its part of the config's task split, or its own JSONL task."""
        task = self.cfg.task
        assert task is not None
        if self.settings.data_path:
            examples = build_task(
                path=Path(self.settings.data_path), labels=task.labels, max_chars=task.max_chars
            )
            return encode(self.tokenizer, examples, task.max_length)
        return build_task_data(task, self.cfg.federation.clients, self.tokenizer, self.cfg.run.seed).clients[
            self.index
        ]

    # ---- state between messages ----------------------------------------------------------------------
    def adapter(self) -> AdapterState:
        return {k: v.cpu() for k, v in self.pool.state(self.name).items()}

    def set_adapter(self, state: Mapping[str, torch.Tensor]) -> None:
        check_payload(state, self.shapes)  # only the SLM adapter is ever accepted
        self.pool.load_state(self.name, {k: v.to(self.device) for k, v in state.items()})

    def trainer_state(self) -> dict[str, Any]:
        return {**self.learner.state_dict(), "rng": torch.get_rng_state()}

    def load_trainer_state(self, state: Mapping[str, Any]) -> None:
        self.learner.load_state_dict(dict(state))
        torch.set_rng_state(state["rng"])
        self._rng_restored = True

    # ---- the work ---------------------------------------------------------------------------------
    def train(self, steps: int | None = None) -> dict[str, float]:
        """Local training of the SLM adapter (answer-only loss), the round's budget unless `steps`."""
        if not self._rng_restored:
            torch.manual_seed(self.cfg.run.seed * 1000 + self.index)
            self._rng_restored = True
        n = self.local_steps(len(self.data)) if steps is None else steps
        t0 = time.perf_counter()
        loss = self.train_learner(self.pool, self.learner, n)
        return {
            "loss": loss,
            "lr": float(self.learner.scheduler.get_last_lr()[0]),
            "steps": float(n),
            "wall_s": time.perf_counter() - t0,
        }

    def weight(self) -> int:
        """This client's FedAvg weight: n_k, or 1 with federation.weighting uniform."""
        return len(self.data) if self.cfg.federation.weighting == "examples" else 1

    def describe(self) -> dict[str, Any]:
        return {
            "partition": self.index,
            "examples": len(self.data),  # n_k: this client's FedAvg weight
            "label_names": [],
            "mixture": [],
            "device": str(self.device),
        }
