"""Federated language-modelling data: tokenized fixed-length windows per client.

Train, validation and test are split by document before windowing, so no window (and no
document) is shared between a client's splits; the public reference set is held out from
every client. Validation feeds the trust evidence, test only the reported figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from cotune.config.schema import DataConfig, SourceConfig
from cotune.data.corpora import DataError, Document, load_documents, read_documents
from cotune.data.files import owner_name
from cotune.data.partition import partition
from cotune.data.task_data import EncodedSet
from cotune.evaluation.generation import GenRequest
from cotune.seeds import numpy_rng, torch_generator

# What a personalized client's split holds: token windows (n, seq_len) of text data, or generation
# examples as an EncodedSet (prompt + response rows, labels -100 off the response: data.kind generation)
Rows = torch.Tensor | EncodedSet


@dataclass
class ClientData:
    train: Rows  # (n_train, seq_len) token ids, or training examples
    val: Rows  # (n_val, seq_len)
    label_counts: dict[str, int]
    test: Rows | None = None  # (n_test, seq_len); None when data.test_fraction is 0
    # generation data: the test examples as prompts to decode (the same examples as `test`, in order)
    test_requests: list[GenRequest] = field(default_factory=list)
    duplicate_documents: int = 0  # an owner's own files: its duplicated documents dropped before its split


@dataclass
class FederatedData:
    clients: list[ClientData]
    public: Rows  # (n_public, seq_len), shared reference set
    label_names: list[str]
    mixtures: torch.Tensor  # clients x labels
    # dropped before any split (`corpora.read_documents`, `generation.shipped_task`): counts, never text
    duplicate_documents: int = 0
    duplicates: int = 0  # generation examples with the same prompt


CHUNK_CHARS = 1 << 16  # a longer text is tokenised piece by piece (fast tokenizers slow down and
# grow their memory faster than linearly with the length of one text: a 20 MB line took 4 GB)


BATCH_CHARS = 1 << 21


def text_chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """`text` in pieces of at most `size` characters, each cut just before a space between two words
    (so every piece but the first starts with " word", as BPE pre-tokenisers split it: the tokens are
    the whole text's), else before any whitespace, else hard; a text of at most `size` is one piece."""
    pieces, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = text.rfind(" ", start + 1, end)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1 : cut + 2].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        if cut <= start:
            cut = max(text.rfind(ws, start + 1, end) for ws in " \n\t")
        cut = cut if cut > start else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def tokenize(docs: Sequence[Document], tokenizer: PreTrainedTokenizerBase) -> list[torch.Tensor]:
    """Each document's token ids (int32, 4 bytes a token); long documents in pieces (`text_chunks`),
    so memory stays a small multiple of the text's size."""
    pieces: list[str] = []
    owner: list[int] = []
    for i, d in enumerate(docs):
        for piece in text_chunks(d.text):
            pieces.append(piece)
            owner.append(i)
    parts: list[list[torch.Tensor]] = [[] for _ in docs]
    start = 0
    while start < len(pieces):  # batches of up to 256 pieces and BATCH_CHARS (the tokenizer's output is
        end, chars = start, 0  # ~50 bytes a token until it becomes int32 ids)
        while end < len(pieces) and end - start < 256 and (end == start or chars < BATCH_CHARS):
            chars += len(pieces[end])
            end += 1
        batch = tokenizer(pieces[start:end], add_special_tokens=False)["input_ids"]
        for i, ids in zip(owner[start:end], batch, strict=True):
            parts[i].append(torch.tensor(ids, dtype=torch.int32))
        start = end
    return [p[0] if len(p) == 1 else torch.cat(p) for p in parts]


def joined(
    token_lists: Sequence[Sequence[int] | torch.Tensor], eos_id: int, need: int | None
) -> torch.Tensor:
    """The documents' ids back to back, each followed by EOS (int32), stopping once `need` are in."""
    eos = torch.tensor([eos_id], dtype=torch.int32)
    pieces: list[torch.Tensor] = []
    total = 0
    for ids in token_lists:
        pieces += [torch.as_tensor(ids, dtype=torch.int32), eos]
        total += len(ids) + 1
        if need is not None and total >= need:
            break
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)


def cut_windows(stream: torch.Tensor, seq_len: int, limit: int | None) -> torch.Tensor:
    """Non-overlapping seq_len windows from the head of `stream` (at most `limit`), as int64 ids."""
    n = len(stream) // seq_len if limit is None else min(limit, len(stream) // seq_len)
    return stream[: n * seq_len].to(torch.long).view(n, seq_len)


def pack_windows(
    token_lists: Sequence[Sequence[int] | torch.Tensor], seq_len: int, eos_id: int, limit: int | None
) -> torch.Tensor:
    """Concatenate documents (EOS-separated) and cut into non-overlapping seq_len windows."""
    return cut_windows(
        joined(token_lists, eos_id, None if limit is None else limit * seq_len), seq_len, limit
    )


def _take_public(order: list[int], lengths: list[int], tokens_needed: int) -> tuple[list[int], list[int]]:
    taken, total = 0, 0
    while taken < len(order) and total < tokens_needed:
        total += lengths[order[taken]] + 1
        taken += 1
    return order[:taken], order[taken:]


def split_documents(
    doc_ids: list[int], cfg: DataConfig, client: int, unit: str = "document"
) -> tuple[list[int], list[int], list[int]]:
    """(train, validation, test) documents (generation data: examples, `unit`) of one client, from its
    shuffled documents: validation first (as before test splits existed, so validation stays put), then
    test, the rest for training; each at least one when its fraction is above 0."""
    n_val = max(1, round(cfg.val_fraction * len(doc_ids)))
    n_test = max(1, round(cfg.test_fraction * len(doc_ids))) if cfg.test_fraction > 0 else 0
    if len(doc_ids) - n_val - n_test < 1:
        splits = "train/validation/test" if n_test else "train/validation"
        raise DataError(
            f"client {client} got {len(doc_ids)} {unit}(s): too few for a {splits} split; use fewer "
            "clients, another partition, or more data" + (", or data.test_fraction: 0" if n_test else "")
        )
    return doc_ids[n_val + n_test :], doc_ids[:n_val], doc_ids[n_val : n_val + n_test]


def build_federated_data(
    cfg: DataConfig, n_clients: int, tokenizer: PreTrainedTokenizerBase, seed: int
) -> FederatedData:
    corpus = read_documents(cfg.resolved_sources())
    docs = corpus.items
    token_lists = tokenize(docs, tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    rng = numpy_rng("partition", seed)

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
        duplicate_documents=corpus.duplicates,
    )


def client_windows(
    docs: Sequence[Document], token_lists: Sequence[torch.Tensor], cfg: DataConfig, eos: int, client: int
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
    docs: Sequence[Document], token_lists: Sequence[torch.Tensor], cfg: DataConfig, eos: int, client: int
) -> ClientData:
    """An owner with too few documents to split by document (one long file): its text as one stream,
    split by position — training the head, then validation, then the test tail — so no window spans two
    splits."""
    stream = joined(token_lists, eos, None)
    n = len(stream)
    n_test = round(cfg.test_fraction * n)
    n_val = round(cfg.val_fraction * n)
    cut_val, cut_test = n - n_val - n_test, n - n_test

    def windows(part: torch.Tensor, limit: int | None) -> torch.Tensor:
        return cut_windows(part, cfg.seq_len, limit)

    train = windows(stream[:cut_val], cfg.max_train_windows)
    val = windows(stream[cut_val:cut_test], cfg.max_val_windows)
    test = windows(stream[cut_test:], cfg.max_test_windows) if n_test else None
    return checked_client_data(docs, train, val, test, cfg, client, n, " by position")


def owner_source(path: Path | str, cfg: DataConfig, label: str | None = None) -> SourceConfig:
    """The files source of one owner's path (or data.public): tables' text in data.text_column."""
    return SourceConfig(corpus="files", path=Path(path), label=label, text_column=cfg.text_column)


def owner_data(
    path: Path, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, client: int
) -> ClientData:
    """A data owner's windows from its own files (data.clients, or a Flower node's data-path): split by
    document when it has enough documents, else by position within its text."""
    try:
        corpus = read_documents([owner_source(path, cfg, owner_name(path))])
    except DataError as exc:
        raise DataError(f"client {client}: {exc}") from exc
    docs = corpus.items
    if not docs:
        raise DataError(f"client {client} has no documents in {path}: give it text, .jsonl or table files")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    order = [int(i) for i in numpy_rng("documents", seed, client).permutation(len(docs))]
    docs = [docs[i] for i in order]
    token_lists = tokenize(docs, tokenizer)
    n_split = 1 + (1 if cfg.test_fraction > 0 else 0)  # a document for validation (and one for test)
    enough = len(docs) > n_split + round((cfg.val_fraction + cfg.test_fraction) * len(docs))
    split = client_windows if enough else positional_windows
    return replace(split(docs, token_lists, cfg, eos, client), duplicate_documents=corpus.duplicates)


def build_owned_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> FederatedData:
    """Per-owner data (data.clients): every client's windows from its own path; the public reference set
    from data.public (none without it)."""
    assert cfg.clients is not None
    clients = [owner_data(path, cfg, tokenizer, seed, c) for c, path in enumerate(cfg.clients)]
    eos = tokenizer.eos_token_id
    assert eos is not None
    public = torch.zeros((0, cfg.seq_len), dtype=torch.long)
    if cfg.public is not None and cfg.public_windows:
        docs = load_documents([owner_source(cfg.public, cfg)])
        public = pack_windows(tokenize(docs, tokenizer), cfg.seq_len, eos, cfg.public_windows)
        if len(public) == 0:
            raise DataError(f"data.public has too little text for one public window of {cfg.seq_len} tokens")
    labels = [owner_name(p) for p in cfg.clients]
    dropped = sum(c.duplicate_documents for c in clients)
    return FederatedData(clients, public, labels, torch.eye(len(clients)), duplicate_documents=dropped)


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
        g = torch_generator("batches", self.seed, self.epoch)
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
