"""The vocabulary map between two tokenizers: each token known by its bytes, matched by exact byte
string, built once per pair and cached on disk under a digest of both vocabularies.

A token's bytes (`token_pieces`) undo its tokenizer's markers:
- byte-level BPE (GPT-2, SmolLM2, Qwen2.5: a `ByteLevel` decoder): each character stands for one byte
  (`Ġ` a space, `Ċ` a newline), read back with GPT-2's `bytes_to_unicode` table;
- SentencePiece (`▁` a space, a `Metaspace` or `Replace` decoder) and its byte-fallback tokens
  `<0x0A>` (one byte each);
- special tokens (EOS, chat-template markers) stay whole: a marker byte string of their text, except
  the EOS token, which is the same marker on both sides (`EOS_PIECE`) whatever its spelling.
Two tokens with the same bytes in one vocabulary (a byte-fallback `<0x41>` and `A`) are one string: the
map goes to the lowest such id.

This is exact matching only: no nearest spelling is guessed (an edit-distance map in the FuseLLM / FATE
style takes hours between 49k and 151k vocabularies, and its nearest spellings are often wrong in
meaning); the rest of the teacher's mass is handled by `algorithms/vocab_alignment`'s stated fallback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from cotune.assets import cache_root

__all__ = ["EOS_PIECE", "TokenizerBridge", "VocabMap", "build_bridge", "token_pieces", "vocab_map"]

SPECIAL = b"\xff\x00special:"  # never the bytes of a text token (0xFF 0x00 is no UTF-8 and no merge)
EOS_PIECE = b"\xff\x00eos"
MAP_FORMAT = 1  # bumped when the normalisation changes: old cache files are then not found
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table read backwards: the character that stands for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def decoder_kinds(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """The marker conventions of a tokenizer, read from its (fast) decoder: 'byte_level', 'metaspace'
    (`▁`), 'byte_fallback' (`<0xNN>`). A tokenizer without a fast backend is taken as SentencePiece."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = None if backend is None else backend.decoder
    if decoder is None:
        return {"metaspace", "byte_fallback"}
    text = json.dumps(json.loads(decoder.__getstate__()))
    kinds = set()
    if '"ByteLevel"' in text:
        kinds.add("byte_level")
    if '"Metaspace"' in text or "\u2581" in text or "\\u2581" in text:
        kinds.add("metaspace")
    if '"ByteFallback"' in text:
        kinds.add("byte_fallback")
    return kinds


def piece_of(token: str, kinds: set[str]) -> bytes:
    """One (non-special) token's bytes under its tokenizer's conventions."""
    if "byte_fallback" in kinds:
        m = _BYTE_FALLBACK.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
    if "byte_level" in kinds:
        table = byte_decoder()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
    if "metaspace" in kinds:
        token = token.replace("\u2581", " ")
    return token.encode("utf-8")


def token_pieces(tokenizer: PreTrainedTokenizerBase) -> list[bytes]:
    """Every id's bytes (see the module's rules), len(tokenizer) of them; ids no token has get b""."""
    kinds = decoder_kinds(tokenizer)
    pieces = [b""] * len(tokenizer)
    specials = set(tokenizer.all_special_ids)
    added = {i: t.special for i, t in tokenizer.added_tokens_decoder.items()}
    for token, i in tokenizer.get_vocab().items():
        if i >= len(pieces):
            continue
        if i in specials or added.get(i, False):
            pieces[i] = SPECIAL + token.encode("utf-8")
        elif i in added:  # an added normal token: its text as written
            pieces[i] = token.encode("utf-8")
        else:
            pieces[i] = piece_of(token, kinds)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id < len(pieces):
        pieces[tokenizer.eos_token_id] = EOS_PIECE
    return pieces


def pieces_digest(pieces: list[bytes]) -> str:
    """A fingerprint of a vocabulary as bytes by id (what the map depends on)."""
    h = hashlib.sha256(f"cotune-vocab-{MAP_FORMAT}\0{len(pieces)}\0".encode())
    for p in pieces:
        h.update(len(p).to_bytes(4, "little"))
        h.update(p)
    return h.hexdigest()


def one_way(source: list[bytes], target: list[bytes]) -> np.ndarray:
    """source id -> target id with the same bytes (-1: none); empty pieces match nothing."""
    index: dict[bytes, int] = {}
    for i, p in enumerate(target):
        if p and p not in index:
            index[p] = i
    return np.fromiter((index.get(p, -1) if p else -1 for p in source), dtype=np.int64, count=len(source))


@dataclass(frozen=True)
class VocabMap:
    """Both ways between vocabularies a and b (id -> id, -1: no exact match), with the digest that
    names it, its build time (0 when read from the cache) and whether it came from the cache."""

    a_to_b: np.ndarray
    b_to_a: np.ndarray
    digest: str
    build_s: float
    cached: bool

    def matched(self) -> tuple[float, float]:
        """Share of each vocabulary with an exact match in the other (a's, b's)."""
        return float((self.a_to_b >= 0).mean()), float((self.b_to_a >= 0).mean())


def map_cache_dir() -> Path:
    """Where vocabulary maps are kept: beside the converted models, under cotune's cache root."""
    return cache_root() / "vocab-maps"


def vocab_map(a: list[bytes], b: list[bytes], cache_dir: Path | None = None) -> VocabMap:
    """The map between two vocabularies (as `token_pieces`), read from the cache when built before,
    else built and saved (atomically; a cache that cannot be written only costs the rebuild)."""
    digest = hashlib.sha256(f"{pieces_digest(a)}:{pieces_digest(b)}".encode()).hexdigest()[:24]
    folder = cache_dir or map_cache_dir()
    path = folder / f"{digest}.npz"
    if path.exists():
        with contextlib.suppress(OSError, ValueError, KeyError):
            with np.load(path) as saved:
                a_to_b, b_to_a = saved["a_to_b"], saved["b_to_a"]
            if len(a_to_b) == len(a) and len(b_to_a) == len(b):
                return VocabMap(a_to_b, b_to_a, digest, 0.0, True)
    t0 = time.perf_counter()
    a_to_b, b_to_a = one_way(a, b), one_way(b, a)
    built = VocabMap(a_to_b, b_to_a, digest, time.perf_counter() - t0, False)
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{digest}-", suffix=".npz", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, a_to_b=a_to_b, b_to_a=b_to_a)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return built


@dataclass(frozen=True)
class TokenizerBridge:
    """What FedCoLLM needs between an SLM and an LLM of different tokenizers: each vocabulary's bytes
    by id, the map both ways (as index tensors), and the LLM's tokenizer (evaluation, its encodings)."""

    slm_pieces: list[bytes]
    llm_pieces: list[bytes]
    slm_to_llm: torch.Tensor
    llm_to_slm: torch.Tensor
    vocab: VocabMap
    llm_tokenizer: PreTrainedTokenizerBase
    seconds: float  # to build it: both vocabularies' bytes and the map (or the map read from the cache)


def build_bridge(
    slm: PreTrainedTokenizerBase, llm: PreTrainedTokenizerBase, cache_dir: Path | None = None
) -> TokenizerBridge:
    """The bridge between the SLM's and the LLM's tokenizers (the map cached, `vocab_map`)."""
    t0 = time.perf_counter()
    a, b = token_pieces(slm), token_pieces(llm)
    m = vocab_map(a, b, cache_dir)
    to_b, to_a = torch.from_numpy(m.a_to_b), torch.from_numpy(m.b_to_a)
    return TokenizerBridge(a, b, to_b, to_a, m, llm, time.perf_counter() - t0)
