"""The personalized family's generation data (`data.kind: generation`): each client's (prompt, response)
examples, split and encoded, in the same `ClientData` / `FederatedData` as token windows.

Where the examples come from: the shipped tasks of `data.sources` (bbc: headlines, python: docstrings,
`generation.shipped_task`), one generation file (`data.path`) dealt by its label column, or one file per
owner (`data.clients`; `data.public` the public set).

The split rule, deterministic in `run.seed`: the examples are shuffled once; the first
`data.public_windows` are the public reference set (prediction trust), the rest are dealt to the clients
by label (`data.partition`, as documents are). Each client's examples are shuffled again and split as
documents are (`windows.split_documents`): validation first (round(val_fraction x n), at least one), then
test (round(test_fraction x n), at least one unless test_fraction is 0), the rest train. The caps
`data.max_train_windows`, `max_val_windows` and `max_test_windows` keep the first that many examples of
each split. An owner's file is shuffled from (seed, client) and split the same way.

Each split is encoded once with `generation.gen_requests` (chat template or plain format, stop token,
`data.seq_len` tokens per example cut by `fit_lengths`): training and the perplexities read the
`EncodedSet` (labels on the response only), test decoding reads the same requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from cotune.config.schema import DataConfig
from cotune.data.errors import DataError
from cotune.data.files import owner_name
from cotune.data.generation import (
    GenExample,
    GenTask,
    gen_requests,
    load_gen_file,
    shipped_task,
    training_tensors,
)
from cotune.data.partition import partition
from cotune.data.task_data import EncodedSet
from cotune.data.windows import ClientData, FederatedData, federated_data, owner_data, split_documents
from cotune.evaluation.generation import GenRequest, pad_token_id
from cotune.seeds import numpy_rng


def encoded(requests: Sequence[GenRequest], pad_id: int) -> EncodedSet:
    """Requests as a training / scoring set: prompt + response rows, labels on the response only."""
    if not requests:
        return EncodedSet(
            torch.zeros((0, 1), dtype=torch.long),
            torch.zeros((0, 1), dtype=torch.long),
            torch.zeros((0, 1), dtype=torch.long),
        )
    return EncodedSet(*training_tensors(requests, pad_id))


def examples_of(cfg: DataConfig) -> GenTask:
    """Every example of the federation: data.path's generation file, else each source's shipped task
    (with the duplicates each dropped before the split)."""
    if cfg.path is not None:
        return GenTask(load_gen_file(cfg.path, cfg.columns, cfg.layout), 0)
    tasks = [shipped_task(source, cfg.max_chars) for source in cfg.sources]
    return GenTask(
        [ex for task in tasks for ex in task.examples],
        sum(task.duplicates for task in tasks),
        sum(task.duplicate_documents for task in tasks),
    )


def requests_of(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, examples: Sequence[GenExample]
) -> list[GenRequest]:
    return gen_requests(tokenizer, examples, cfg.seq_len, cfg.chat_template) if examples else []


def client_examples(
    examples: Sequence[GenExample], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, client: int
) -> ClientData:
    """One client's train / validation / test sets from its (shuffled) examples, split by example."""
    train_ids, val_ids, test_ids = split_documents(list(range(len(examples))), cfg, client, "example")
    pad = pad_token_id(tokenizer)

    def part(ids: list[int], cap: int | None) -> list[GenRequest]:
        return requests_of(cfg, tokenizer, [examples[i] for i in ids[:cap]])

    test = part(test_ids, cfg.max_test_windows) if test_ids else None
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex.label] = counts.get(ex.label, 0) + 1
    return ClientData(
        train=encoded(part(train_ids, cfg.max_train_windows), pad),
        val=encoded(part(val_ids, cfg.max_val_windows), pad),
        label_counts=counts,
        test=None if test is None else encoded(test, pad),
        test_requests=test or [],
    )


def federated_examples(
    cfg: DataConfig, n_clients: int, tokenizer: PreTrainedTokenizerBase, seed: int
) -> FederatedData:
    """The shared examples (data.sources or data.path): the public set first, the rest dealt by label."""
    task = examples_of(cfg)
    examples = task.examples
    rng = numpy_rng("partition", seed)
    order = [int(i) for i in rng.permutation(len(examples))]
    n_public = min(cfg.public_windows, len(examples))
    public, rest = order[:n_public], sorted(order[n_public:])
    if not rest:
        raise DataError(
            f"the public reference set ({cfg.public_windows} examples) takes all {len(examples)} examples, "
            "none is left for the clients: lower data.public_windows"
        )
    part = partition([examples[i].label for i in rest], n_clients, cfg.partition, rng)
    clients = []
    for c, local in enumerate(part.indices):
        ids = [rest[i] for i in local]
        rng.shuffle(ids)
        clients.append(client_examples([examples[i] for i in ids], cfg, tokenizer, c))
    return FederatedData(
        clients=clients,
        public=public_set(cfg, tokenizer, [examples[i] for i in public]),
        label_names=part.label_names,
        mixtures=torch.tensor(part.mixtures, dtype=torch.float32),
        duplicate_documents=task.duplicate_documents,
        duplicates=task.duplicates,
    )


def public_set(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, examples: Sequence[GenExample]
) -> EncodedSet:
    """The public reference set: its first data.public_windows examples, encoded as every client's."""
    return encoded(requests_of(cfg, tokenizer, examples[: cfg.public_windows]), pad_token_id(tokenizer))


def public_file(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, path: Path | str) -> EncodedSet:
    """The public reference set from a generation file (data.public, a Flower node's public-path)."""
    return public_set(cfg, tokenizer, load_gen_file(Path(path), cfg.columns, cfg.layout))


def owner_examples(
    path: Path, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, client: int
) -> ClientData:
    """A data owner's examples from its own generation file (data.clients, a Flower node's data-path),
    shuffled from (seed, client) and split by example."""
    try:
        examples = load_gen_file(path, cfg.columns, cfg.layout)
        order = numpy_rng("documents", seed, client).permutation(len(examples))
        return client_examples([examples[int(i)] for i in order], cfg, tokenizer, client)
    except DataError as exc:
        raise DataError(f"client {client}: {exc}") from exc


def owned_examples(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> FederatedData:
    """Per-owner generation data (data.clients): every client's own file; data.public the public set."""
    assert cfg.clients is not None
    clients = [owner_examples(Path(p), cfg, tokenizer, seed, c) for c, p in enumerate(cfg.clients)]
    public = public_file(cfg, tokenizer, cfg.public) if cfg.public is not None else encoded([], 0)
    labels = [owner_name(p) for p in cfg.clients]
    return FederatedData(clients=clients, public=public, label_names=labels, mixtures=torch.eye(len(clients)))


def client_data(
    cfg: DataConfig, n_clients: int, tokenizer: PreTrainedTokenizerBase, seed: int
) -> FederatedData:
    """The personalized family's data of either kind: token windows (text) or generation examples."""
    if cfg.kind == "text":
        return federated_data(cfg, n_clients, tokenizer, seed)
    if cfg.clients is not None:
        return owned_examples(cfg, tokenizer, seed)
    return federated_examples(cfg, n_clients, tokenizer, seed)


def own_client_data(
    path: Path, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, client: int
) -> ClientData:
    """A data owner's own split of either kind (a Flower SuperNode's data-path)."""
    if cfg.kind == "text":
        return owner_data(path, cfg, tokenizer, seed, client)
    return owner_examples(path, cfg, tokenizer, seed, client)
