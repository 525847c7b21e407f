"""A multiple-choice task made ready for federated co-tuning: splits, tokenized sets, batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from cotune.config.schema import TaskConfig
from cotune.data.corpora import DataError
from cotune.data.tasks import (
    TaskSplits,
    build_task,
    encode_for_training,
    example_label,
    load_task_file,
    split_task,
)
from cotune.evaluation.multiple_choice import MCExample, encode_pair
from cotune.seeds import numpy_rng


@dataclass
class EncodedSet:
    """Prompt/answer examples as right-padded tensors; labels are -100 except on the answer."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    # (N, C): the first token of each of the example's choices, -1 where it has fewer; only for the
    # public set (distillation over the choices, distill.kd_target 'choices')
    choices: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """Rows `idx`, with the padding columns that no row of this batch uses trimmed off."""
        mask = self.attention_mask[idx]
        width = int(mask.sum(1).max())
        out = {
            "input_ids": self.input_ids[idx, :width].to(device),
            "attention_mask": mask[:, :width].to(device),
            "labels": self.labels[idx, :width].to(device),
        }
        if self.choices is not None:
            out["choices"] = self.choices[idx].to(device)
        return out


@dataclass
class TaskData:
    splits: TaskSplits
    public: EncodedSet  # the server's public set D_a (less its validation split): what it trains on
    clients: list[EncodedSet]  # private sets D_k
    union: EncodedSet  # all client data + D_a (less its validation split): the centralized baseline's
    test: list[MCExample]  # held-out multiple-choice evaluation set
    public_val: list[MCExample] = field(default_factory=list)  # the server's validation split of D_a

    @property
    def client_sizes(self) -> list[int]:
        return [len(c) for c in self.clients]


def encode(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[MCExample], max_length: int, choices: bool = False
) -> EncodedSet:
    ids, mask, labels = encode_for_training(tokenizer, examples, max_length)
    return EncodedSet(ids, mask, labels, choice_first_tokens(tokenizer, examples) if choices else None)


def choice_first_tokens(tokenizer: PreTrainedTokenizerBase, examples: Sequence[MCExample]) -> torch.Tensor:
    """(N, C): the first answer token of each choice, as training and the evaluator split it; -1 pads a
    row with fewer choices, and a first token two choices share appears once."""
    rows = []
    for ex in examples:
        firsts = []
        for c in ex.choices:
            token = encode_pair(tokenizer, ex.prompt, c)[1][0]
            if token not in firsts:
                firsts.append(token)
        rows.append(firsts)
    out = torch.full((len(rows), max((len(r) for r in rows), default=0)), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def carve_validation(public: Sequence[MCExample], fraction: float) -> tuple[list[MCExample], list[MCExample]]:
    """(train, val): the last round(fraction x |D_a|) examples of the (already shuffled) public set
    become the server's validation split; both parts keep at least one example."""
    if fraction == 0.0:
        return list(public), []
    n_val = round(fraction * len(public))
    if n_val < 1 or n_val >= len(public):
        raise DataError(
            f"distill.val_fraction {fraction} of a public set of {len(public)} examples leaves "
            f"{n_val} for validation and {len(public) - n_val} to distil on: each needs at least one"
        )
    return list(public[: len(public) - n_val]), list(public[len(public) - n_val :])


def owned_splits(cfg: TaskConfig) -> TaskSplits:
    """Per-owner data (task.clients): every client's own JSONL task file, the server's public set and
    the held-out test set from their own files; errors name the file (and line)."""
    assert cfg.clients is not None and cfg.public is not None and cfg.test is not None
    clients: list[list[MCExample]] = []
    for c, path in enumerate(cfg.clients):
        examples = load_task_file(Path(path), cfg.columns)
        if not examples:
            raise DataError(f"client {c}'s task file {path} has no examples")
        clients.append(list(examples))
    public: list[MCExample] = list(load_task_file(Path(cfg.public), cfg.columns))
    test: list[MCExample] = list(load_task_file(Path(cfg.test), cfg.columns))
    parts: list[list[MCExample]] = [public, test, *clients]
    labels = sorted({example_label(ex) for part in parts for ex in part})
    return TaskSplits(public=public, clients=clients, test=test, labels=labels)


def build_task_data(
    cfg: TaskConfig,
    n_clients: int,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    public_val_fraction: float = 0.0,
) -> TaskData:
    """The task's splits, tokenized. `public_val_fraction` of D_a becomes the server's validation split:
    no algorithm trains on it (the centralized baseline's union leaves it out too); the client splits and
    the test split do not depend on it."""
    rng = numpy_rng("partition", seed)
    if cfg.clients is not None:
        splits = owned_splits(cfg)
    else:
        examples = build_task(
            cfg.source, cfg.path, labels=cfg.labels, max_chars=cfg.max_chars, columns=cfg.columns
        )
        splits = split_task(examples, n_clients, cfg.test_fraction, cfg.partition, rng)
    if not splits.public:
        raise DataError("the public set D_a is empty: FedCoLLM's server needs labelled public examples")
    test = list(splits.test)
    if cfg.max_test_examples is not None and len(test) > cfg.max_test_examples:
        keep = sorted(rng.permutation(len(test))[: cfg.max_test_examples].tolist())
        test = [test[i] for i in keep]
    public, public_val = carve_validation(splits.public, public_val_fraction)
    union = [ex for part in [public, *splits.clients] for ex in part]
    return TaskData(
        splits=splits,
        public=encode(tokenizer, public, cfg.max_length, choices=True),
        clients=[encode(tokenizer, part, cfg.max_length) for part in splits.clients],
        union=encode(tokenizer, union, cfg.max_length),
        test=test,
        public_val=public_val,
    )
