"""Generation evaluation: what a model generates for a prompt, judged against the reference response.

`GenRequest` is the one form in which an example reaches the evaluator (the data layer builds it, with
the tokenizer's chat template applied or not); decoding and scoring live beside it.

Decoding is greedy, batched and uses transformers' own KV cache: prompts are left-padded with an
attention mask and explicit position ids (each row counts positions from its own first token), so a
prompt decodes to the same tokens in a batch as alone, and the same as one-by-one
`model.generate(do_sample=False)` (tests/test_generation_eval.py, tests/integration). Scores:

- exact match and token F1 after SQuAD's normalisation (lowercase; drop ASCII punctuation and the
  articles a / an / the; collapse whitespace), F1 over the bags of normalised words, 1.0 when both
  sides normalise to nothing and 0.0 when only one does (SQuAD v2's rule);
- ROUGE-L F-measure by `rouge-score` (its LCS, no stemmer), with a tokenizer that lowercases and splits
  on anything that is not a letter or digit: on ASCII text exactly the library's default tokenizer,
  which would turn every non-Latin word (accents, Greek, Cyrillic, ...) into nothing and score it 0;
- the perplexity of the reference responses, teacher-forced on prompt + response, over the response
  tokens only (the stop token included): exp of the summed loss over all response tokens of all
  examples divided by their number, so long responses weigh by their tokens, as `evaluate_lm` does.

All three text scores are averaged over examples.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cotune.evaluation.multiple_choice import keeps_kv_cache
from cotune.records import SAMPLE_PROMPT_CHARS, SAMPLE_TEXT_CHARS

OnDone = Callable[[int], None]  # examples finished by the batch just run: progress, in examples
Decode = Callable[[list[int]], str]  # token ids -> text (a tokenizer's decode, special tokens skipped)


@dataclass(frozen=True)
class GenRequest:
    """One generation example as token ids.

    `prompt_ids`: everything the model is given (chat template and generation prompt included, already
    cut to fit); `response_ids`: the reference response's tokens, closed by the stop token (EOS or the
    template's end-of-turn), which training learns and perplexity scores; `reference`: the response's
    text, what generated text is compared with; `prompt`: the example's prompt text as the data gave it
    (before any template), kept only to show a sample of shipped public data (`gen_samples`), and not
    part of what makes two requests equal.
    """

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    reference: str
    prompt: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class GenEval:
    """Scores over `n` examples (each a mean over examples; `ppl` per response token) and the generated
    texts in request order. The texts are data: never log or print them
    (but for `gen_samples` of shipped public data)."""

    n: int
    exact_match: float
    f1: float
    rouge_l: float
    ppl: float
    predictions: list[str]

    def as_dict(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "exact_match": self.exact_match,
            "f1": self.f1,
            "rouge_l": self.rouge_l,
            "ppl": self.ppl,
        }


@dataclass(frozen=True)
class GenSample:
    """One example shown with what a model generated for it: the prompt (its start), the reference
    response and the generation, each cut to a bounded length (`gen_samples`). Only ever built from
    shipped public data (`config.schema.shipped_generation`): a user's examples are never shown."""

    example: int  # its index in the evaluated split
    prompt: str
    reference: str
    generated: str


SAMPLES = 3  # examples a run records with their generations, per model or client, at its final round


def cut(text: str, limit: int) -> str:
    """`text` at most `limit` characters long, a cut one ending in "…"."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def gen_samples(
    requests: Sequence[GenRequest], predictions: Sequence[str], count: int = SAMPLES
) -> list[GenSample]:
    """The first `count` evaluated examples (the split's order: the same examples for every model and
    round) with their generations, each text cut (`SAMPLE_PROMPT_CHARS`, `SAMPLE_TEXT_CHARS`). The
    caller decides whether the data may be shown at all."""
    return [
        GenSample(
            i,
            cut(req.prompt, SAMPLE_PROMPT_CHARS),
            cut(req.reference, SAMPLE_TEXT_CHARS),
            cut(generated, SAMPLE_TEXT_CHARS),
        )
        for i, (req, generated) in enumerate(zip(requests, predictions[:count], strict=False))
    ]


# ---- text scores ----------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop ASCII punctuation, drop the articles a / an / the, and
    collapse whitespace, so "The Cat!" and "cat" are the same answer."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two normalise to the same string, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's F1 over the bags of normalised words; when either side is empty, 1.0 if both are."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


class WordTokenizer:
    """rouge-score's default tokenisation (lowercase, split on anything but letters and digits) made
    Unicode-aware: identical tokens on ASCII text, and words in other scripts kept instead of erased."""

    _SPLIT = re.compile(r"[\W_]+")

    def tokenize(self, text: str) -> list[str]:
        return [t for t in self._SPLIT.split(text.lower()) if t]


@functools.cache
def rouge_scorer() -> Any:
    """The ROUGE-L scorer, built on first use: rouge-score imports nltk and scipy.stats (~1.7 s), which
    every Flower process that imports this module but never scores text (workers, ClientApps) skips."""
    from rouge_score import rouge_scorer as scorers

    return scorers.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=WordTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score's LCS, no stemmer); 0.0 when either side has no words."""
    return float(rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


# ---- decoding -------------------------------------------------------------------------------------------
def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The ids that end a generated response: the model's generation config's EOS ids (one or a list:
    instruct models often name the end-of-turn and the end-of-text token) and the tokenizer's EOS."""
    config = getattr(model, "generation_config", None)
    named = getattr(config, "eos_token_id", None)
    ids = [] if named is None else [named] if isinstance(named, int) else list(named)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted({int(i) for i in ids})


def pad_token_id(tokenizer: Any) -> int:
    """The id that fills left padding (never attended): the tokenizer's pad, else its EOS, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token rows left-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, tokens in enumerate(rows):
        if tokens:
            ids[r, width - len(tokens) :] = torch.tensor(list(tokens), dtype=torch.long)
            mask[r, width - len(tokens) :] = 1
    return ids, mask


def _cache_key(out: Any) -> str:
    """The name under which the model returns and takes its KV cache (`past_key_values` before
    transformers 5.2x, `cache` since)."""
    return "cache" if "cache" in out else "past_key_values"


def _decode_batch(
    model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, stops: set[int], pad_id: int
) -> list[list[int]]:
    """Greedy continuations of one batch on the model's KV cache. Rows that stop leave the batch (their
    cache rows are dropped), so the cost of a step follows the rows still running."""
    device = next(model.parameters()).device
    ids, mask = _left_padded(prompts, pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from its own first token
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        logits_to_keep=1,
    )
    key = _cache_key(out)
    mask = mask.to(device)
    next_pos = torch.tensor([len(p) for p in prompts], device=device)
    running = list(range(len(prompts)))  # batch row -> prompt index
    generated: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        tokens = out.logits[:, -1].argmax(-1)
        keep = []
        for row, token in enumerate(tokens.tolist()):
            if token not in stops:
                generated[running[row]].append(token)
                keep.append(row)
        if not keep or step == max_new_tokens - 1:
            break
        cache = out[key]
        if len(keep) < len(running):
            rows = torch.tensor(keep, device=device)
            cache.reorder_cache(rows)
            tokens, mask, next_pos = tokens[rows], mask[rows], next_pos[rows]
            running = [running[row] for row in keep]
        mask = torch.cat([mask, mask.new_ones((len(running), 1))], dim=1)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            use_cache=True,
            **{key: cache},
        )
        next_pos = next_pos + 1
    return generated


def _decode_alone(model: nn.Module, prompt: Sequence[int], max_new_tokens: int, stops: set[int]) -> list[int]:
    """Greedy continuation of one prompt by full forwards, for models without a transformers KV cache
    (test stubs, custom LMs): the whole sequence is run again for every token."""
    device = next(model.parameters()).device
    tokens = list(prompt)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=torch.tensor([tokens], device=device)).logits[0, -1].argmax())
        if token in stops:
            break
        generated.append(token)
        tokens.append(token)
    return generated


def _check_prompts(prompts: Sequence[Sequence[int]], batch_size: int, max_new_tokens: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"generation request {i} has an empty prompt: nothing to continue")


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices longest first (ties in given order): batches of similar lengths pad little."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    on_done: OnDone | None = None,
) -> list[list[int]]:
    """The greedy continuation of each prompt, in the order of `prompts`, without its stop token.

    A row ends when it produces any of `stop_ids` (EOS, the chat template's end-of-turn) or after
    `max_new_tokens` tokens. Transformers models (and peft wrappers, `AdapterPool` views) decode in
    batches of `batch_size` prompts of similar lengths, left-padded, on their own KV cache; other
    models one prompt at a time without a cache. Deterministic: no sampling, ties go to the lower token
    id (`argmax`, as `generate`). The model is put in eval mode and its mode restored afterwards.
    `on_done(n)` after each batch, n prompts finished (they add up to ``len(prompts)``).
    """
    _check_prompts(prompts, batch_size, max_new_tokens)
    stops = {int(s) for s in stop_ids}
    order = length_order([len(p) for p in prompts])
    results: list[list[int]] = [[] for _ in prompts]
    batched = keeps_kv_cache(model)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if batched:
                outs = _decode_batch(model, [prompts[i] for i in chunk], max_new_tokens, stops, pad_id)
            else:
                outs = [_decode_alone(model, prompts[i], max_new_tokens, stops) for i in chunk]
            for i, tokens in zip(chunk, outs, strict=True):
                results[i] = tokens
            if on_done is not None:
                on_done(len(chunk))
    finally:
        model.train(was_training)
    return results


# ---- reference perplexity -------------------------------------------------------------------------------
@torch.no_grad()
def response_nll(
    model: nn.Module, requests: Sequence[GenRequest], *, batch_size: int = 8, pad_id: int = 0
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, tokens) of each reference response given its prompt, teacher-
    forced on prompt + response (right-padded: real positions keep their ids and never see padding);
    the loss covers the response tokens only, the stop token included."""
    for i, req in enumerate(requests):
        if not req.prompt_ids or not req.response_ids:
            raise ValueError(f"generation request {i} has an empty prompt or response: nothing to score")
    device = next(model.parameters()).device
    order = length_order([len(r.prompt_ids) + len(r.response_ids) for r in requests])
    results: list[tuple[float, int]] = [(0.0, 0)] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            rows = [[*requests[i].prompt_ids, *requests[i].response_ids] for i in chunk]
            width = len(rows[0])
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, tokens in enumerate(rows):
                ids[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                mask[r, : len(tokens)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for r, i in enumerate(chunk):
                n_prompt, n_response = len(requests[i].prompt_ids), len(requests[i].response_ids)
                scored = logits[r, n_prompt - 1 : n_prompt - 1 + n_response].float()
                target = torch.tensor(requests[i].response_ids, dtype=torch.long, device=scored.device)
                results[i] = (float(F.cross_entropy(scored, target, reduction="sum")), n_response)
            del logits
    finally:
        model.train(was_training)
    return results


def perplexity(nlls: Sequence[tuple[float, int]]) -> float:
    """exp(total loss / total tokens) of (summed loss, tokens) pairs; the exponent is capped so a
    hopeless model gives a huge number, not an overflow."""
    tokens = sum(n for _, n in nlls)
    if tokens == 0:
        raise ValueError("nothing to score: no response tokens")
    return math.exp(min(sum(loss for loss, _ in nlls) / tokens, 700.0))


# ---- the entry point ------------------------------------------------------------------------------------
def evaluate_generation(
    model: nn.Module,
    requests: Sequence[GenRequest],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    stop_ids: Sequence[int],
    pad_id: int,
    decode: Decode,
    max_examples: int | None = None,
    on_done: OnDone | None = None,
    reference_ppl: float | None = None,
) -> GenEval:
    """Greedy generations for the first `max_examples` requests (all when None) scored against their
    references (exact match, F1, ROUGE-L: means over examples) and the references' perplexity.

    Each batch is decoded and its references scored before the next, and `on_done(n)` is called after
    each with the n examples it finished (they add up to `generation_count(requests, max_examples)`).
    `reference_ppl`: the references' perplexity when the caller has scored these very requests already
    (a personalized client's test split: `evaluate_lm` on the rows encoded from them), taken as it is
    instead of a second teacher-forced pass over every prompt and response.
    """
    chosen = list(requests if max_examples is None else requests[:max_examples])
    if not chosen:
        raise ValueError("nothing to evaluate: no generation examples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if reference_ppl is not None and len(chosen) < len(requests):
        raise ValueError("reference_ppl covers every request: it cannot stand for the first max_examples")
    predictions: list[str] = [""] * len(chosen)
    nlls: list[tuple[float, int]] = [(0.0, 0)] * len(chosen)
    order = length_order([len(r.prompt_ids) for r in chosen])
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = [chosen[i] for i in chunk]
        outs = greedy_decode(
            model,
            [r.prompt_ids for r in batch],
            batch_size=len(batch),
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            pad_id=pad_id,
        )
        if reference_ppl is None:
            for i, nll in zip(
                chunk, response_nll(model, batch, batch_size=len(batch), pad_id=pad_id), strict=True
            ):
                nlls[i] = nll
        for i, tokens in zip(chunk, outs, strict=True):
            predictions[i] = decode(tokens)
        if on_done is not None:
            on_done(len(chunk))
    n = len(chosen)
    refs = [r.reference for r in chosen]
    pairs = list(zip(predictions, refs, strict=True))
    return GenEval(
        n=n,
        exact_match=sum(exact_match(p, r) for p, r in pairs) / n,
        f1=sum(token_f1(p, r) for p, r in pairs) / n,
        rouge_l=sum(rouge_l(p, r) for p, r in pairs) / n,
        ppl=perplexity(nlls) if reference_ppl is None else reference_ppl,
        predictions=predictions,
    )


def generation_count(requests: Sequence[GenRequest], max_examples: int | None = None) -> int:
    """How many examples `evaluate_generation` scores: its progress total."""
    return len(requests) if max_examples is None else min(len(requests), max(max_examples, 0))


def context_length(model: nn.Module) -> int | None:
    """The most positions the model reads (its config's `max_position_embeddings`; None: not stated)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def fit_context(requests: Sequence[GenRequest], context: int | None, max_new_tokens: int) -> list[GenRequest]:
    """The requests with each prompt cut from the left (as `fit_lengths` cuts it) so that the prompt and
    `max_new_tokens` generated tokens fit in `context` positions; unchanged when they fit (or no limit).
    The reference response is never cut here: its perplexity is scored as training encoded it."""
    if context is None:
        return list(requests)
    room = context - max_new_tokens
    if room < 1:
        raise ValueError(
            f"task.max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
            f"{context} positions: lower task.max_new_tokens"
        )
    return [r if len(r.prompt_ids) <= room else replace(r, prompt_ids=r.prompt_ids[-room:]) for r in requests]
