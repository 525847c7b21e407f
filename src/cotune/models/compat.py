"""Checks that two models can teach each other: FedCoLLM distils logits token by token."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from cotune.errors import OrdinaryError


class TokenizerMismatchError(ValueError, OrdinaryError):
    """The LLM and the SLM do not share a tokenizer, so their logits are not comparable."""


def check_same_tokenizer(
    slm: PreTrainedTokenizerBase, llm: PreTrainedTokenizerBase, names: tuple[str, str]
) -> None:
    a, b = slm.get_vocab(), llm.get_vocab()
    if a == b:
        return
    only_a = len(set(a) - set(b))
    only_b = len(set(b) - set(a))
    moved = sum(1 for t in set(a) & set(b) if a[t] != b[t])
    raise TokenizerMismatchError(
        f"the SLM ({names[0]}, {len(a)} tokens) and the LLM ({names[1]}, {len(b)} tokens) have different "
        f"tokenizers ({only_a} tokens only in the SLM, {only_b} only in the LLM, {moved} with other ids); "
        "FedCoLLM distils per-token distributions and needs models of one tokenizer family "
        "(e.g. qwen2.5-coder-1.5b-instruct with qwen2.5-coder-0.5b-instruct)"
    )
