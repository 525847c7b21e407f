"""Tiny random models and a byte-level tokenizer: real architectures, no download, for tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cotune.config.schema import TinyModelConfig
from cotune.seeds import stream_seed

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 258-token byte-level tokenizer (256 bytes + EOS + PAD), built in memory.

    Byte-level BPE with no merges maps every UTF-8 byte to one token, so any text is
    encodable and two tiny models of different sizes share the exact same vocabulary.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    vocab[PAD] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


# Merges of common English letter pairs: a second tokenizer over the same bytes that splits text
# differently from `byte_tokenizer` (words of several bytes, its EOS and PAD at other ids), for tests of
# distillation across tokenizers.
MERGES = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    ("Ġ", "a"),
    ("o", "n"),
    ("r", "e"),
    ("Ġ", "s"),
    ("e", "s"),
    ("Ġ", "b"),
    ("Ġ", "c"),
    ("n", "d"),
    ("Ġa", "nd"),
    ("i", "s"),
    ("o", "r"),
    ("e", "n"),
    ("a", "t"),
    ("Ġ", "o"),
    ("Ġo", "f"),
    ("Ġ", "w"),
    ("in", "g"),
    ("Ġ", "p"),
    ("e", "d"),
    ("Ġ", "m"),
    ("Ġ", "i"),
    ("Ġi", "n"),
    ("o", "u"),
    ("a", "l"),
    ("Ġ", "f"),
    ("Ġ", "h"),
]


def merged_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the merges of `MERGES` (EOS and PAD after the merged tokens): the
    same bytes as `byte_tokenizer`, other token boundaries and ids."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab[EOS] = len(vocab)
    vocab[PAD] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def tiny_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """The tiny model's tokenizer by `model.tiny.tokenizer`: 'bytes' or 'merges'."""
    return merged_tokenizer() if kind == "merges" else byte_tokenizer()


def build_tiny_model(cfg: TinyModelConfig, vocab_size: int) -> LlamaForCausalLM:
    """A randomly initialised Llama with q/k/v/o and MLP projections named as in real checkpoints."""
    if cfg.vocab_size is not None and cfg.vocab_size < vocab_size:
        raise ValueError(f"model.tiny.vocab_size {cfg.vocab_size} < the tokenizer's {vocab_size} tokens")
    config = LlamaConfig(
        vocab_size=cfg.vocab_size or vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed("model", cfg.seed))
        model = LlamaForCausalLM(config)
    return model
