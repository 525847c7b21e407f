"""Multiple-choice evaluation by log-likelihood, the way lm-evaluation-harness scores it.

Each choice is a continuation of the prompt; its score is the summed log-probability of the
continuation tokens given the prompt. ``acc`` picks the highest total, ``acc_norm`` the highest
total per UTF-8 byte of the choice, so long answers are not penalised just for having more tokens.
Tokenisation, left truncation and batching follow the harness so numbers are comparable with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers import PretrainedConfig

Request = tuple[list[int], list[int]]
OnScored = Callable[[int], None]  # (requests) scored by the batch just run: progress, in choices


class Encoder(Protocol):
    """The part of a Hugging Face tokenizer used here, so tests can pass a small fake."""

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str, *, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class MCExample:
    """A prompt, its candidate continuations (usually with a leading space) and the right one's index."""

    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class MCResult:
    """Accuracies over ``n`` examples; ``logliks[i][j]`` is the score of choice j of example i."""

    acc: float
    acc_norm: float
    n: int
    logliks: list[list[float]]

    def as_dict(self) -> dict[str, float | int]:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "n": self.n}


def _prefix_token_id(tokenizer: Encoder) -> int:
    """BOS, else EOS, as the harness's ``prefix_token_id``: some token must precede the first scored one."""
    token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("tokenizer has neither a BOS nor an EOS token to start the context with")
    return int(token_id)


def encode_pair(tokenizer: Encoder, prompt: str, choice: str, add_bos: bool = False) -> Request:
    """Token ids of (context, continuation), split as lm-evaluation-harness does.

    Trailing whitespace of the prompt moves to the start of the continuation (so " Paris" is
    tokenised as a word with its space). The continuation is the tail of ``encode(prompt + choice)``
    after ``encode(prompt)``, which keeps the tokenisation the model saw in training; if the joint
    encoding does not start with the prompt's (a merge across the boundary) the choice is encoded
    on its own instead. ``add_bos`` prepends BOS (EOS if there is none) for models that need it;
    an empty context also gets that token, since the first continuation token needs something to
    be predicted from.
    """
    n_spaces = len(prompt) - len(prompt.rstrip())
    if n_spaces:
        choice = prompt[-n_spaces:] + choice
        prompt = prompt[:-n_spaces]
    context = list(tokenizer.encode(prompt, add_special_tokens=False)) if prompt else []
    whole = list(tokenizer.encode(prompt + choice, add_special_tokens=False))
    if whole[: len(context)] == context:
        continuation = whole[len(context) :]
    else:
        continuation = list(tokenizer.encode(choice, add_special_tokens=False))
    if not continuation:
        raise ValueError(f"choice {choice!r} encodes to no tokens after prompt {prompt!r}")
    if add_bos or not context:
        context = [_prefix_token_id(tokenizer), *context]
    return context, continuation


def _window(request: Request, max_length: int, index: int) -> tuple[list[int], list[int]]:
    """The model input for one request: context + continuation minus its last token, left-truncated."""
    context, continuation = request
    if not context:
        raise ValueError(f"request {index} has no context tokens: nothing predicts its first token")
    if not continuation:
        raise ValueError(f"request {index} has an empty continuation")
    if len(continuation) > max_length:
        raise ValueError(
            f"request {index} has {len(continuation)} continuation tokens, more than max_length={max_length}"
        )
    full = [*context, *continuation]
    return full[-(max_length + 1) :][:-1], list(continuation)


@torch.no_grad()
def score_requests(
    model: nn.Module,
    requests: Sequence[Request],
    batch_size: int = 8,
    max_length: int = 512,
    pad_id: int = 0,
    on_scored: OnScored | None = None,
) -> list[float]:
    """Summed log-probability of each continuation given its context, in the order of ``requests``.

    Requests whose model inputs are identical share one forward pass: the choices of one question
    that are a single token each (topic labels, A/B/C/D) differ only in the token scored at the
    last position, so a k-way question costs one forward instead of k (the harness's one-token
    continuation trick). Choices of several tokens share their question's context through the KV
    cache instead (`shared_context_groups`), for transformers models. Inputs are batched longest
    first so each batch pads little, and right-padded so real positions keep their position ids
    and never attend to padding.
    Log-softmax runs only on the continuation rows of one batch's logits, never on the full
    (B, T, V) tensor. Inputs longer than ``max_length`` lose context tokens from the left;
    continuation tokens are always kept. The model is put in eval mode (no dropout) and its
    previous mode restored afterwards. ``on_scored(n)`` after each batch, with the number of requests
    it scored (they add up to ``len(requests)``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    windows = [_window(req, max_length, i) for i, req in enumerate(requests)]
    groups = shared_context_groups(requests, max_length) if keeps_kv_cache(model) else []
    shared = {i for _, users in groups for i in users}
    scores: list[float] = [0.0] * len(windows)
    if groups:
        shared_scores = _score_shared_contexts(model, groups, requests, batch_size, pad_id, on_scored)
        for i, value in shared_scores.items():
            scores[i] = value
    inputs: dict[tuple[int, ...], list[int]] = {}  # distinct model input -> the requests it serves
    for i, (inp, _) in enumerate(windows):
        if i not in shared:
            inputs.setdefault(tuple(inp), []).append(i)
    distinct = list(inputs.items())
    order = sorted(range(len(distinct)), key=lambda u: (-len(distinct[u][0]), u))
    device = next(model.parameters()).device
    only_scored = keeps_kv_cache(model)  # a transformers model computes logits at the scored positions only
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = [distinct[u] for u in order[start : start + batch_size]]
            width = len(batch[0][0])
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (tokens, _) in enumerate(batch):
                ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                mask[row, : len(tokens)] = 1
            # each row's scored positions: the last `span` (its longest continuation) of its real tokens
            wanted = [
                range(len(tokens) - max(len(windows[i][1]) for i in users), len(tokens))
                for tokens, users in batch
            ]
            scored = sorted({p for positions in wanted for p in positions})
            column = {p: c for c, p in enumerate(scored)} if only_scored else {p: p for p in range(width)}
            kept = {"logits_to_keep": torch.tensor(scored, device=device)} if only_scored else {}
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kept).logits
            served: list[int] = []
            sums: list[torch.Tensor] = []
            for row, ((_, users), positions) in enumerate(zip(batch, wanted, strict=True)):
                span = len(positions)
                logprobs = torch.log_softmax(logits[row, [column[p] for p in positions]].float(), dim=-1)
                for i in users:
                    continuation = windows[i][1]
                    target = torch.tensor(continuation, dtype=torch.long, device=logprobs.device)
                    rows = logprobs[span - len(continuation) :]
                    sums.append(rows.gather(-1, target[:, None]).sum())
                    served.append(i)
            del logits
            for i, value in zip(served, torch.stack(sums).tolist(), strict=True):
                scores[i] = float(value)
            if on_scored is not None:
                on_scored(len(served))
    finally:
        model.train(was_training)
    return scores


def keeps_kv_cache(model: nn.Module) -> bool:
    """Whether `model` is a transformers causal LM (or a peft wrapper of one), whose forward can return
    and reuse a key/value cache; other callables (test stubs, custom LMs) are scored input by input."""
    return isinstance(getattr(model, "config", None), PretrainedConfig)


def shared_context_groups(requests: Sequence[Request], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, request indices) for contexts that several requests continue, at least one of them by
    more than one token, none truncated: those are scored by running the context once
    (`_score_shared_contexts`). One-token continuations of a context already share a forward in
    `score_requests`; a truncated window would give each continuation different context tokens."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(requests):
        by_context.setdefault(tuple(context), []).append(i)
    groups = []
    for key, users in by_context.items():
        longest = max(len(requests[i][1]) for i in users)
        if len(users) > 1 and longest > 1 and key and len(key) + longest - 1 <= max_length:
            groups.append((list(key), users))
    groups.sort(key=lambda g: -len(g[0]))
    return groups


def _right_padded(
    rows: Sequence[Sequence[int]], pad_id: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token rows right-padded to `width`."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, tokens in enumerate(rows):
        ids[r, : len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
        mask[r, : len(tokens)] = 1
    return ids, mask


def _score_shared_contexts(
    model: nn.Module,
    groups: Sequence[tuple[list[int], list[int]]],
    requests: Sequence[Request],
    batch_size: int,
    pad_id: int,
    on_scored: OnScored | None = None,
) -> dict[int, float]:
    """Scores of the requests in `groups`: each context is run once with the KV cache kept, then all its
    continuations in one batch on top of the cache, so a k-way question with multi-token choices costs
    about one context forward instead of k. The first continuation token is scored from the context's
    last logits; the cache's padding slots are masked and positions are explicit, so each continuation
    sees exactly the positions and tokens it would in a forward of its own."""
    device = next(model.parameters()).device
    scores: dict[int, float] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(groups), batch_size):
            batch = groups[start : start + batch_size]
            lengths = torch.tensor([len(context) for context, _ in batch])
            width = int(lengths.max())
            ids, mask = _right_padded([context for context, _ in batch], pad_id, width)
            keep = sorted({int(n) - 1 for n in lengths})  # the logits of each context's last position only
            out = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=torch.arange(width)[None].expand(len(batch), width).to(device),
                use_cache=True,
                logits_to_keep=torch.tensor(keep, device=device),
            )
            column = {n: c for c, n in enumerate(keep)}
            last = out.logits[torch.arange(len(batch)), [column[int(n) - 1] for n in lengths]]
            first = torch.log_softmax(last.float(), dim=-1)
            rows = [(b, i) for b, (_, users) in enumerate(batch) for i in users]
            cache_key = "cache" if "cache" in out else "past_key_values"  # its name before transformers 5.2x
            cache = out[cache_key]
            cache.reorder_cache(torch.tensor([b for b, _ in rows], device=device))
            tails = [requests[i][1][:-1] for _, i in rows]
            tail = max(1, max(len(t) for t in tails))
            tail_ids, tail_mask = _right_padded(tails, pad_id, tail)
            owner = torch.tensor([b for b, _ in rows])
            positions = lengths[owner][:, None] + torch.arange(tail)[None]
            logits = model(
                input_ids=tail_ids.to(device),
                attention_mask=torch.cat([mask[owner], tail_mask], dim=1).to(device),
                position_ids=positions.to(device),
                **{cache_key: cache},
                use_cache=False,
            ).logits
            for r, (b, i) in enumerate(rows):
                continuation = requests[i][1]
                total = first[b, continuation[0]]
                if len(continuation) > 1:
                    logprobs = torch.log_softmax(logits[r, : len(continuation) - 1].float(), dim=-1)
                    target = torch.tensor(continuation[1:], device=logprobs.device)
                    total = total + logprobs.gather(-1, target[:, None]).sum()
                scores[i] = float(total)
            del out, logits, cache
            if on_scored is not None:
                on_scored(len(rows))
    finally:
        model.train(was_training)
    return scores


def _argmax(values: Sequence[float]) -> int:
    """Index of the first maximum: ties go to the earlier choice, deterministically (as numpy.argmax)."""
    best = 0
    for i in range(1, len(values)):
        if values[i] > values[best]:
            best = i
    return best


def choose(logliks: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(pred, pred_norm): argmax of the log-likelihood, and of log-likelihood per UTF-8 byte of the choice.

    Ties go to the first maximal index. Byte length is measured on the choice string as given
    (leading space included), matching lm-evaluation-harness's byte-length normalisation.
    """
    if len(logliks) != len(choices):
        raise ValueError(f"{len(logliks)} log-likelihoods for {len(choices)} choices")
    if not choices:
        raise ValueError("no choices to choose from")
    lengths = [len(c.encode("utf-8")) for c in choices]
    if min(lengths) == 0:
        raise ValueError("an empty choice has no byte length to normalise by")
    return _argmax(logliks), _argmax([ll / n for ll, n in zip(logliks, lengths, strict=True)])


def _check_example(example: MCExample, index: int) -> None:
    """Reject examples whose accuracy would be meaningless, naming the example so data bugs are findable."""
    if len(example.choices) < 2:
        raise ValueError(f"example {index} has {len(example.choices)} choice(s); at least 2 are needed")
    if not 0 <= example.answer < len(example.choices):
        raise ValueError(
            f"example {index} has answer index {example.answer}, "
            f"outside 0..{len(example.choices) - 1} for its {len(example.choices)} choices"
        )
    for j, choice in enumerate(example.choices):
        if not choice:
            raise ValueError(f"example {index} choice {j} is an empty continuation")


def evaluate_multiple_choice(
    model: nn.Module,
    tokenizer: Encoder,
    examples: Sequence[MCExample],
    batch_size: int = 8,
    max_length: int = 512,
    add_bos: bool = False,
    on_scored: OnScored | None = None,
) -> MCResult:
    """acc and acc_norm over ``examples``; every choice of every example is scored in one batched pass.

    The choices of one example share its prompt's forward pass (see `score_requests`). ``on_scored(n)``
    after each batch: n choices scored, ``choice_count(examples)`` in all.
    """
    if not examples:
        raise ValueError("nothing to evaluate: no multiple-choice examples")
    for i, example in enumerate(examples):
        _check_example(example, i)
    requests = [encode_pair(tokenizer, ex.prompt, c, add_bos=add_bos) for ex in examples for c in ex.choices]
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    flat = score_requests(
        model, requests, batch_size=batch_size, max_length=max_length, pad_id=pad_id, on_scored=on_scored
    )
    logliks: list[list[float]] = []
    correct = correct_norm = 0
    offset = 0
    for example in examples:
        scores = flat[offset : offset + len(example.choices)]
        offset += len(example.choices)
        logliks.append(scores)
        pred, pred_norm = choose(scores, example.choices)
        correct += pred == example.answer
        correct_norm += pred_norm == example.answer
    n = len(examples)
    return MCResult(acc=correct / n, acc_norm=correct_norm / n, n=n, logliks=logliks)


def choice_count(examples: Sequence[MCExample]) -> int:
    """How many choices `evaluate_multiple_choice` scores on `examples`: its progress total."""
    return sum(len(ex.choices) for ex in examples)
