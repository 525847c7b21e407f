"""A task (multiple choice or generation) made ready for federated co-tuning: splits, tokenized sets,
batches. Both kinds give the same `EncodedSet`s: prompt + target rows whose labels are -100 except on the
target (the right answer; the response and its stop token)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal

import torch
from transformers import PreTrainedTokenizerBase

from cotune.config.schema import TaskConfig
from cotune.data.corpora import DataError
from cotune.data.generation import GenExample, gen_requests, load_gen_file, shipped_task, training_tensors
from cotune.data.tasks import (
    Example,
    TaskSplits,
    build_task,
    encode_for_training,
    example_label,
    load_task_file,
    source_task,
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
    # each batch also names its rows ("rows", on the CPU): the same examples encoded by another tokenizer
    # (`with_llm_encoding`) are found by them
    rows: bool = False

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
        if self.rows:
            out["rows"] = idx.cpu()
        return out


@dataclass
class TaskData(Generic[Example]):
    """Examples are MCExamples (task.kind multiple_choice) or GenExamples (generation: evaluation
    encodes them with `generation.gen_requests`)."""

    splits: TaskSplits[Example]
    public: EncodedSet  # the server's public set D_a (less its validation split): what it trains on
    clients: list[EncodedSet]  # private sets D_k
    union: EncodedSet  # all client data + D_a (less its validation split): the centralized baseline's
    test: list[Example]  # held-out evaluation set
    public_val: list[Example] = field(default_factory=list)  # the server's validation split of D_a
    # dropped before the split: duplicated documents (a task from a corpus) and examples (same prompt: a
    # shipped generation task)
    duplicate_documents: int = 0
    duplicates: int = 0
    # an LLM of another tokenizer (`with_llm_encoding`): the public set and the union encoded by it, row
    # for row as `public` and `union`
    llm_public: EncodedSet | None = None
    llm_union: EncodedSet | None = None

    @property
    def client_sizes(self) -> list[int]:
        return [len(c) for c in self.clients]


def encode(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[MCExample], max_length: int, choices: bool = False
) -> EncodedSet:
    ids, mask, labels = encode_for_training(tokenizer, examples, max_length)
    return EncodedSet(ids, mask, labels, choice_first_tokens(tokenizer, examples) if choices else None)


def encode_generation(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[GenExample],
    max_length: int,
    chat_template: Literal["auto", "none"] = "auto",
) -> EncodedSet:
    """Generation examples as a training set: prompt + response rows (chat template or plain format,
    `generation.fit_lengths` truncation), loss on the response tokens and their stop token only."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
    requests = gen_requests(tokenizer, examples, max_length, chat_template)
    return EncodedSet(*training_tensors(requests, int(pad_id)))


def encode_task_set(
    cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Any], choices: bool = False
) -> EncodedSet:
    """A training set of the task's kind; `choices` (the public set's choice tokens) for multiple choice."""
    if cfg.kind == "generation":
        return encode_generation(tokenizer, examples, cfg.max_length, cfg.chat_template)
    return encode(tokenizer, examples, cfg.max_length, choices=choices)


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


def carve_validation(public: Sequence[Example], fraction: float) -> tuple[list[Example], list[Example]]:
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


def task_file(cfg: TaskConfig, path: Path) -> list[Any]:
    """One task file of the task's kind: multiple-choice examples or generation examples."""
    if cfg.kind == "generation":
        return list(load_gen_file(path, cfg.columns, cfg.layout))
    return list(load_task_file(path, cfg.columns))


def owned_set(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase, path: Path) -> EncodedSet:
    """A client's own task file (a Flower SuperNode's data-path) as its training set."""
    return encode_task_set(cfg, tokenizer, task_file(cfg, path))


def owned_splits(cfg: TaskConfig, owners: bool = True) -> TaskSplits[Any]:
    """Per-owner data (task.clients): every client's own task file, the server's public set and
    the held-out test set from their own files; errors name the file (and line). Without `owners` (a
    Flower ServerApp: each owner's file is on its own SuperNode) the clients' parts are left empty."""
    assert cfg.clients is not None and cfg.public is not None and cfg.test is not None
    clients: list[list[Any]] = [[] for _ in cfg.clients]
    for c, path in enumerate(cfg.clients if owners else []):
        clients[c] = task_file(cfg, Path(path))
        if not clients[c]:
            raise DataError(f"client {c}'s task file {path} has no examples")
    public = task_file(cfg, Path(cfg.public))
    test = task_file(cfg, Path(cfg.test))
    parts: list[list[Any]] = [public, test, *clients]
    labels = sorted({example_label(ex) for part in parts for ex in part})
    return TaskSplits(public=public, clients=clients, test=test, labels=labels)


def with_llm_encoding(cfg: TaskConfig, task: TaskData[Any], tokenizer: PreTrainedTokenizerBase) -> None:
    """Give `task` the public set and the union encoded by the LLM's own `tokenizer` (an LLM of another
    tokenizer than the SLM's): the same examples in the same rows, so a public batch's "rows" (now named
    in every batch of `task.public`) find the LLM's encoding of its examples."""
    public = task.splits.public[: len(task.splits.public) - len(task.public_val)]
    union = [ex for part in [public, *task.splits.clients] for ex in part]
    task.llm_public = encode_task_set(cfg, tokenizer, public)
    task.llm_union = encode_task_set(cfg, tokenizer, union)
    task.public.rows = True


def build_task_data(
    cfg: TaskConfig,
    n_clients: int,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    public_val_fraction: float = 0.0,
    owners: bool = True,
) -> TaskData[Any]:
    """The task's splits, tokenized. `public_val_fraction` of D_a becomes the server's validation split:
    no algorithm trains on it (the centralized baseline's union leaves it out too); the client splits and
    the test split do not depend on it. A generation task splits as a multiple-choice one (by label).
    Without `owners`, per-owner files (task.clients) are not read: the clients' parts are empty."""
    rng = numpy_rng("partition", seed)
    duplicates = duplicate_documents = 0
    if cfg.clients is not None:
        splits = owned_splits(cfg, owners)
    else:
        examples: list[Any]
        if cfg.kind == "generation" and cfg.source is not None:
            built = shipped_task(cfg.source, cfg.max_chars)
            examples, duplicates = built.examples, built.duplicates
            duplicate_documents = built.duplicate_documents
        elif cfg.kind == "generation":
            assert cfg.path is not None
            examples = task_file(cfg, Path(cfg.path))
        elif cfg.source is not None:
            topic = source_task(cfg.source, labels=cfg.labels, max_chars=cfg.max_chars)
            examples, duplicate_documents = topic.items, topic.duplicates
        else:
            examples = build_task(path=cfg.path, columns=cfg.columns)
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
        public=encode_task_set(cfg, tokenizer, public, choices=True),
        clients=[encode_task_set(cfg, tokenizer, part) for part in splits.clients],
        union=encode_task_set(cfg, tokenizer, union),
        test=test,
        public_val=public_val,
        duplicates=duplicates,
        duplicate_documents=duplicate_documents,
    )
