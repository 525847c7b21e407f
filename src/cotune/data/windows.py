"""Federated language-modelling data: tokenized fixed-length windows per client.

Train, validation and test are split by document before windowing, so no window (and no
document) is shared between a client's splits; the public reference set is held out from
every client. Validation feeds the trust evidence, test only the reported figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from cotune.config.schema import DataConfig, SourceConfig
from cotune.data.corpora import DataError, Document, load_documents
from cotune.data.partition import partition


@dataclass
class ClientData:
    train: torch.Tensor  # (n_train, seq_len) token ids
    val: torch.Tensor  # (n_val, seq_len)
    label_counts: dict[str, int]
    test: torch.Tensor | None = None  # (n_test, seq_len); None when data.test_fraction is 0


@dataclass
class FederatedData:
    clients: list[ClientData]
    public: torch.Tensor  # (n_public, seq_len), shared reference set
    label_names: list[str]
    mixtures: torch.Tensor  # clients x labels


def tokenize(docs: Sequence[Document], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    texts = [d.text for d in docs]
    ids: list[list[int]] = []
    for start in range(0, len(texts), 256):
        ids.extend(tokenizer(texts[start : start + 256], add_special_tokens=False)["input_ids"])
    return ids


def pack_windows(
    token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int, limit: int | None
) -> torch.Tensor:
    """Concatenate documents (EOS-separated) and cut into non-overlapping seq_len windows."""
    stream: list[int] = []
    need = None if limit is None else limit * seq_len
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // seq_len if limit is None else min(limit, len(stream) // seq_len)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _take_public(order: list[int], lengths: list[int], tokens_needed: int) -> tuple[list[int], list[int]]:
    taken, total = 0, 0
    while taken < len(order) and total < tokens_needed:
        total += lengths[order[taken]] + 1
        taken += 1
    return order[:taken], order[taken:]


def split_documents(
    doc_ids: list[int], cfg: DataConfig, client: int
) -> tuple[list[int], list[int], list[int]]:
    """(train, validation, test) documents of one client, from its shuffled documents: validation first
    (as before test splits existed, so validation stays put), then test, the rest for training."""
    n_val = max(1, round(cfg.val_fraction * len(doc_ids)))
    n_test = max(1, round(cfg.test_fraction * len(doc_ids))) if cfg.test_fraction > 0 else 0
    if len(doc_ids) - n_val - n_test < 1:
        splits = "train/validation/test" if n_test else "train/validation"
        raise DataError(
            f"client {client} got {len(doc_ids)} document(s): too few for a {splits} split; use fewer "
            "clients, another partition, or more data" + (", or data.test_fraction: 0" if n_test else "")
        )
    return doc_ids[n_val + n_test :], doc_ids[:n_val], doc_ids[n_val : n_val + n_test]


def build_federated_data(
    cfg: DataConfig, n_clients: int, tokenizer: PreTrainedTokenizerBase, seed: int
) -> FederatedData:
    docs = load_documents(cfg.resolved_sources())
    token_lists = tokenize(docs, tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    rng = np.random.default_rng(seed)

    order = [int(i) for i in rng.permutation(len(docs))]
    public_idx, rest = _take_public(order, [len(t) for t in token_lists], cfg.public_windows * cfg.seq_len)
    public = pack_windows([token_lists[i] for i in public_idx], cfg.seq_len, eos, cfg.public_windows)
    if cfg.public_windows and len(public) == 0:
        raise DataError(f"too little text for {cfg.public_windows} public windows of {cfg.seq_len} tokens")

    if not rest:
        raise DataError(
            f"the public reference set ({cfg.public_windows} windows of {cfg.seq_len} tokens) takes all "
            "the text, none is left for the clients: lower data.public_windows or data.seq_len"
        )
    rest = sorted(rest)
    part = partition([docs[i].label for i in rest], n_clients, cfg.partition, rng)
    clients = []
    for c, local in enumerate(part.indices):
        doc_ids = [rest[i] for i in local]
        rng.shuffle(doc_ids)
        clients.append(
            client_windows([docs[i] for i in doc_ids], [token_lists[i] for i in doc_ids], cfg, eos, c)
        )
    return FederatedData(
        clients=clients,
        public=public,
        label_names=part.label_names,
        mixtures=torch.tensor(part.mixtures, dtype=torch.float32),
    )


def client_windows(
    docs: Sequence[Document], token_lists: Sequence[Sequence[int]], cfg: DataConfig, eos: int, client: int
) -> ClientData:
    """One client's train / validation / test windows from its (shuffled) documents, split by document."""
    train_docs, val_docs, test_docs = split_documents(list(range(len(docs))), cfg, client)

    def windows(ids: list[int], limit: int | None) -> torch.Tensor:
        return pack_windows([token_lists[i] for i in ids], cfg.seq_len, eos, limit)

    train, val = windows(train_docs, cfg.max_train_windows), windows(val_docs, cfg.max_val_windows)
    test = windows(test_docs, cfg.max_test_windows) if test_docs else None
    n_tok = sum(len(t) + 1 for t in token_lists)
    return checked_client_data(docs, train, val, test, cfg, client, n_tok, "")


def checked_client_data(
    docs: Sequence[Document],
    train: torch.Tensor,
    val: torch.Tensor,
    test: torch.Tensor | None,
    cfg: DataConfig,
    client: int,
    n_tokens: int,
    how: str,
) -> ClientData:
    """A client's windows, refused when a split came out empty; its documents counted by label."""
    if len(train) == 0 or len(val) == 0 or (test is not None and len(test) == 0):
        splits = "train, validation and test" if test is not None else "train and validation"
        raise DataError(
            f"client {client} has too little text ({n_tokens} tokens) for {splits} windows of "
            f"{cfg.seq_len} tokens{how}; lower data.seq_len or give it more data"
        )
    counts: dict[str, int] = {}
    for d in docs:
        counts[d.label] = counts.get(d.label, 0) + 1
    return ClientData(train=train, val=val, label_counts=counts, test=test)


def positional_windows(
    docs: Sequence[Document], token_lists: Sequence[Sequence[int]], cfg: DataConfig, eos: int, client: int
) -> ClientData:
    """An owner with too few documents to split by document (one long file): its text as one stream,
    split by position — training the head, then validation, then the test tail — so no window spans two
    splits."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos)
    n = len(stream)
    n_test = round(cfg.test_fraction * n)
    n_val = round(cfg.val_fraction * n)
    cut_val, cut_test = n - n_val - n_test, n - n_test

    def windows(part: list[int], limit: int | None) -> torch.Tensor:
        k = len(part) // cfg.seq_len if limit is None else min(limit, len(part) // cfg.seq_len)
        return torch.tensor(part[: k * cfg.seq_len], dtype=torch.long).view(k, cfg.seq_len)

    train = windows(stream[:cut_val], cfg.max_train_windows)
    val = windows(stream[cut_val:cut_test], cfg.max_val_windows)
    test = windows(stream[cut_test:], cfg.max_test_windows) if n_test else None
    return checked_client_data(docs, train, val, test, cfg, client, n, " by position")


def owner_data(
    path: Path, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, client: int
) -> ClientData:
    """A data owner's windows from its own files (data.clients, or a Flower node's data-path): split by
    document when it has enough documents, else by position within its text."""
    label = Path(path).stem  # the owner's name: its directory, or its file without the extension
    try:
        docs = load_documents([SourceConfig(corpus="files", path=Path(path), label=label)])
    except DataError as exc:
        raise DataError(f"client {client}: {exc}") from exc
    if not docs:
        raise DataError(f"client {client} has no documents in {path}: give it text, .jsonl or table files")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    order = [int(i) for i in np.random.default_rng([seed, client]).permutation(len(docs))]
    docs = [docs[i] for i in order]
    token_lists = tokenize(docs, tokenizer)
    n_split = 1 + (1 if cfg.test_fraction > 0 else 0)  # a document for validation (and one for test)
    enough = len(docs) > n_split + round((cfg.val_fraction + cfg.test_fraction) * len(docs))
    if enough:
        return client_windows(docs, token_lists, cfg, eos, client)
    return positional_windows(docs, token_lists, cfg, eos, client)


def build_owned_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> FederatedData:
    """Per-owner data (data.clients): every client's windows from its own path; the public reference set
    from data.public (none without it)."""
    assert cfg.clients is not None
    clients = [owner_data(path, cfg, tokenizer, seed, c) for c, path in enumerate(cfg.clients)]
    eos = tokenizer.eos_token_id
    assert eos is not None
    public = torch.zeros((0, cfg.seq_len), dtype=torch.long)
    if cfg.public is not None and cfg.public_windows:
        docs = load_documents([SourceConfig(corpus="files", path=cfg.public)])
        public = pack_windows(tokenize(docs, tokenizer), cfg.seq_len, eos, cfg.public_windows)
        if len(public) == 0:
            raise DataError(f"data.public has too little text for one public window of {cfg.seq_len} tokens")
    labels = [Path(p).stem for p in cfg.clients]
    return FederatedData(clients=clients, public=public, label_names=labels, mixtures=torch.eye(len(clients)))


def federated_data(
    cfg: DataConfig, n_clients: int, tokenizer: PreTrainedTokenizerBase, seed: int
) -> FederatedData:
    """The clients' windows: per-owner data when data.clients lists it, else one corpus partitioned."""
    if cfg.clients is not None:
        return build_owned_data(cfg, tokenizer, seed)
    return build_federated_data(cfg, n_clients, tokenizer, seed)


class WindowSampler:
    """A client's data cursor: reshuffled every epoch from (seed, epoch), so its state is two ints."""

    def __init__(self, n_windows: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n_windows, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def next_indices(self) -> torch.Tensor:
        out = []
        need = min(self.batch_size, self.n)
        while need:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            take = self._perm[self.pos : self.pos + need]
            out.append(take)
            self.pos += len(take)
            need -= len(take)
        return torch.cat(out)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()
