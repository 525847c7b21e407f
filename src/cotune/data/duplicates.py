"""Exact duplicates dropped before any split: a document or example seen twice would otherwise land in
both a training split and the test split (the BBC corpus holds about a hundred copied articles).

One rule for every task built from a corpus: the first occurrence is kept (the corpora are read in a
fixed order, so the result is deterministic), later ones are dropped and counted; the count is shown,
never the dropped text (it may be private data).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Deduped(Generic[T]):
    """Items with later duplicates dropped, and how many were dropped."""

    items: list[T]
    duplicates: int


def dedupe(items: Iterable[T], key: Callable[[T], Hashable]) -> Deduped[T]:
    """Keep the first item of each `key`, in order; count the others."""
    seen: set[Hashable] = set()
    kept: list[T] = []
    dropped = 0
    for item in items:
        k = key(item)
        if k in seen:
            dropped += 1
            continue
        seen.add(k)
        kept.append(item)
    return Deduped(kept, dropped)


def same_text(text: str) -> str:
    """The key under which two documents are the same: their words in order, whitespace differences
    (line endings, indentation, trailing blanks) ignored; case and punctuation kept."""
    return " ".join(text.split())
