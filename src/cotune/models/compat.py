"""Whether two models share a tokenizer (FedCoLLM's own path) and what distillation across tokenizers
cannot do (`models/vocab_map`, `algorithms/vocab_alignment`: what it can)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from cotune.errors import OrdinaryError


class TokenizerMismatchError(ValueError, OrdinaryError):
    """A setting that needs the LLM and the SLM to share a tokenizer, with two tokenizers."""


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers have one vocabulary (the same token at every id): FedCoLLM's own path."""
    return bool(a.get_vocab() == b.get_vocab())


def check_cross_tokenizer(kd_target: str) -> None:
    """Distillation across tokenizers carries distributions over the vocabulary; the choices' first
    tokens are each tokenizer's own, so distill.kd_target 'choices' needs one tokenizer."""
    if kd_target == "choices":
        raise TokenizerMismatchError(
            "distill.kd_target 'choices' compares the models' logits at the choices' first tokens, which "
            "differ between the SLM's and the LLM's tokenizers (model, llm.model); use "
            "distill.kd_target 'vocab' (positions aligned by their text, the teacher's top-k carried "
            "through the vocabulary map)"
        )
