"""Split labelled items across clients: one label each, mixed, Dirichlet or IID.

Pure functions on label lists: they return item indices per client, so they can be
tested on synthetic labels and reused for any kind of item (documents, QA examples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cotune.config.schema import PartitionConfig


@dataclass(frozen=True)
class Partition:
    indices: list[list[int]]  # item indices of each client
    label_names: list[str]
    mixtures: np.ndarray  # clients x labels, each row the client's label proportions

    @property
    def n_clients(self) -> int:
        return len(self.indices)


def _split_by_weights(items: list[int], weights: Sequence[float]) -> list[list[int]]:
    """Cut a list into consecutive chunks with sizes proportional to weights (largest remainder)."""
    w = np.asarray(weights, dtype=float)
    if w.sum() <= 0:
        return [[] for _ in w]
    exact = w / w.sum() * len(items)
    sizes = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - sizes), kind="stable")[: len(items) - sizes.sum()]:
        sizes[i] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [items[bounds[i] : bounds[i + 1]] for i in range(len(w))]


def _label_weights(
    cfg: PartitionConfig, n_clients: int, n_labels: int, rng: np.random.Generator
) -> np.ndarray:
    """labels x clients: how each label's items are shared among the clients."""
    weights = np.zeros((n_labels, n_clients))
    if cfg.kind == "one_label":
        for c in range(n_clients):
            weights[c % n_labels, c] = 1.0
    elif cfg.kind == "mixed":
        for c in range(n_clients):
            weights[c % n_labels, c] += cfg.major_fraction
            weights[(c + 1) % n_labels, c] += 1.0 - cfg.major_fraction
    elif cfg.kind == "dirichlet":
        weights = rng.dirichlet(np.full(n_clients, cfg.alpha), size=n_labels)
    else:
        raise ValueError(f"unknown label partition {cfg.kind!r}")
    return weights


def partition(
    labels: Sequence[str], n_clients: int, cfg: PartitionConfig, rng: np.random.Generator
) -> Partition:
    names = list(cfg.labels) if cfg.labels is not None else sorted(set(labels))
    missing = [n for n in names if n not in set(labels)]
    if missing:
        raise ValueError(
            f"partition.labels {missing} do not occur in the data (labels: {sorted(set(labels))})"
        )
    by_label = {n: [i for i, lab in enumerate(labels) if lab == n] for n in names}
    for items in by_label.values():
        rng.shuffle(items)

    clients: list[list[int]] = [[] for _ in range(n_clients)]
    if cfg.kind == "iid":
        pool = [i for n in names for i in by_label[n]]
        rng.shuffle(pool)
        for c, chunk in enumerate(_split_by_weights(pool, [1.0] * n_clients)):
            clients[c] = chunk
    else:
        weights = _label_weights(cfg, n_clients, len(names), rng)
        for li, name in enumerate(names):
            for c, chunk in enumerate(_split_by_weights(by_label[name], weights[li])):
                clients[c].extend(chunk)

    label_index = {n: i for i, n in enumerate(names)}
    mixtures = np.zeros((n_clients, len(names)))
    for c, items in enumerate(clients):
        for i in items:
            mixtures[c, label_index[labels[i]]] += 1
    totals = mixtures.sum(axis=1, keepdims=True)
    mixtures = np.divide(mixtures, totals, out=np.zeros_like(mixtures), where=totals > 0)
    return Partition(indices=[sorted(c) for c in clients], label_names=names, mixtures=mixtures)
