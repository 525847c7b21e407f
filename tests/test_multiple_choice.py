"""Multiple-choice scoring: exact log-likelihoods, batch invariance, normalisation and tokenisation rules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from cotune.config.schema import TinyModelConfig
from cotune.evaluation.multiple_choice import (
    MCExample,
    choose,
    encode_pair,
    evaluate_multiple_choice,
    score_requests,
    shared_context_groups,
)
from cotune.models.tiny import build_tiny_model, byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(TinyModelConfig(), len(tok)).eval()


def _manual_loglik(model: nn.Module, context: list[int], continuation: list[int]) -> torch.Tensor:
    """Reference: one unpadded forward, log-softmax everywhere, pick each continuation token by hand."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    total = torch.zeros((), dtype=torch.float32)
    for j, token in enumerate(continuation):
        total = total + logprobs[len(context) - 1 + j, token]
    return total


def _requests(tok) -> list[tuple[list[int], list[int]]]:
    pairs = [
        ("The capital of France is", " Paris"),
        ("Q: 2+2?\nA:", " 4"),
        ("A much longer prompt about a business that sells fruit and vegetables:", " apples and pears"),
        ("Hi", " there, friend"),
        ("Short", " x"),
        ("The capital of France is", " Lyon"),
        ("One more example with medium length", " ok"),
    ]
    return [encode_pair(tok, p, c) for p, c in pairs]


def test_score_requests_equals_manual_sum_of_log_softmax(tok, model):
    requests = _requests(tok)
    scores = score_requests(model, requests, batch_size=3)
    for (context, continuation), score in zip(requests, scores, strict=True):
        torch.testing.assert_close(torch.tensor(score), _manual_loglik(model, context, continuation))
    assert all(s < 0 for s in scores)


def test_batch_size_does_not_change_scores_or_order(tok, model):
    requests = _requests(tok)
    lengths = {len(c) + len(k) for c, k in requests}
    assert len(lengths) > 3, "requests should have different lengths so batches really pad"
    one = score_requests(model, requests, batch_size=1)
    five = score_requests(model, requests, batch_size=5, pad_id=tok.pad_token_id)
    torch.testing.assert_close(torch.tensor(five), torch.tensor(one), atol=1e-5, rtol=0)
    # Reversed input gives reversed output: results follow the caller's order, not the sorted one.
    rev = score_requests(model, requests[::-1], batch_size=5)
    torch.testing.assert_close(torch.tensor(rev[::-1]), torch.tensor(one), atol=1e-5, rtol=0)


class CountingModel(nn.Module):
    """Wraps a model and counts the sequences it is asked to run."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, input_ids, attention_mask=None):
        self.rows += input_ids.shape[0]
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_requests_with_identical_inputs_share_one_forward(tok, model):
    """Single-token choices of one question, and a request whose input equals another's, run once."""
    questions = ["Which letter comes first?\nAnswer:", "Pick the vowel:"]
    requests = [encode_pair(tok, q, c) for q in questions for c in ["A", "B", "C", "D"]]
    assert all(len(k) == 1 for _, k in requests)
    context, continuation = encode_pair(tok, "Hello", " there")
    shifted = (context + continuation[:-1], continuation[-1:])  # same model input, shorter span
    requests += [(context, continuation), shifted, encode_pair(tok, "Other", " one")]
    counting = CountingModel(model)
    scores = score_requests(counting, requests, batch_size=2)
    assert counting.rows == 4  # 2 questions + the shared "Hello there" input + "Other one"
    for (ctx, cont), score in zip(requests, scores, strict=True):
        torch.testing.assert_close(torch.tensor(score), _manual_loglik(model, ctx, cont))


def test_a_transformers_model_computes_logits_at_the_scored_positions_only(tok, model):
    """The vocabulary projection runs on each row's continuation positions, not on every position of
    the batch (a quarter of a small model's forward, and a (batch, length, vocabulary) tensor never
    made); the scores are those of the full logits bit for bit, rows of different lengths and spans
    sharing a batch."""
    questions = ["Which letter comes first?\nAnswer:", "Pick the vowel in this much longer question:"]
    requests = [encode_pair(tok, q, c) for q in questions for c in ["A", "B", "C", "D"]]
    requests += [encode_pair(tok, "Hello", " there"), encode_pair(tok, "Other", " one two")]
    rows: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: rows.append(out.shape[1]))
    try:
        scores = score_requests(model, requests, batch_size=4)
    finally:
        hook.remove()
    full = score_requests(CountingModel(model), requests, batch_size=4)  # no transformers config
    assert scores == full
    longest = max(len(c) + len(k) - 1 for c, k in requests)
    assert rows and max(rows) < longest // 2, rows


def test_score_requests_restores_training_mode(tok):
    model = build_tiny_model(TinyModelConfig(), len(tok)).train()
    score_requests(model, _requests(tok)[:2])
    assert model.training


def test_left_truncation_keeps_every_continuation_token(tok, model):
    context, continuation = encode_pair(
        tok, "A long preamble that will not fit. " * 4 + "Answer:", " yes indeed"
    )
    max_length = 16
    assert len(context) + len(continuation) > max_length + 1
    (score,) = score_requests(model, [(context, continuation)], max_length=max_length)
    # The harness window: the last max_length + 1 tokens, i.e. the continuation plus the context's tail.
    kept = max_length + 1 - len(continuation)
    expected = _manual_loglik(model, context[-kept:], continuation)
    torch.testing.assert_close(torch.tensor(score), expected)
    (full,) = score_requests(model, [(context, continuation)], max_length=512)
    torch.testing.assert_close(torch.tensor(full), _manual_loglik(model, context, continuation))
    assert score != pytest.approx(full, abs=1e-6), "truncation should have changed the context"


def _multi_token_questions(tok) -> list[tuple[list[int], list[int]]]:
    prompts = ["The capital of France is", "A much longer prompt about a shop that sells fruit:", "Hi"]
    choices = [" Paris", " apples and pears", " x", " Lyon is big"]
    return [encode_pair(tok, p, c) for p in prompts for c in choices]


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_multi_token_choices_share_their_context_and_score_as_alone(tok, model, batch_size):
    """Several-token choices of one prompt run the prompt once (KV cache) and get the scores each
    choice gets in a forward of its own (padding of contexts and continuations changes nothing)."""
    requests = _multi_token_questions(tok)
    groups = shared_context_groups(requests, max_length=512)
    assert [len(users) for _, users in groups] == [4, 4, 4]
    widths: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        shared = score_requests(model, requests, batch_size=batch_size)
    finally:
        hook.remove()
    alone = [score_requests(model, [r])[0] for r in requests]
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(alone), atol=1e-4, rtol=0)
    for (context, continuation), score in zip(requests, shared, strict=True):
        torch.testing.assert_close(
            torch.tensor(score), _manual_loglik(model, context, continuation), atol=1e-4, rtol=0
        )
    longest_context = max(len(c) for c, _ in requests)
    longest_choice = max(len(k) for _, k in requests)
    assert len(widths) == 2 * -(-3 // batch_size)  # a context pass and a continuation pass per batch
    assert max(widths) == longest_context and min(widths) <= longest_choice - 1


def test_shared_contexts_through_a_peft_adapter(tok):
    base = build_tiny_model(TinyModelConfig(), len(tok)).eval()
    peft_model = get_peft_model(
        base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    with torch.no_grad():  # a non-zero adapter, so the adapter's path is really exercised
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    requests = _multi_token_questions(tok)
    shared = score_requests(peft_model, requests, batch_size=4)
    alone = [score_requests(peft_model, [r])[0] for r in requests]
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(alone), atol=1e-4, rtol=0)
    with peft_model.disable_adapter():  # the adapter changes the scores: its path was really taken
        plain = score_requests(peft_model, requests, batch_size=4)
    assert max(abs(a - b) for a, b in zip(shared, plain, strict=True)) > 0.1


def test_truncated_or_single_token_contexts_are_not_shared(tok):
    requests = _multi_token_questions(tok)
    short_context = min(len(c) for c, _ in requests)
    longest_choice = max(len(k) for _, k in requests)
    # a window that would cut the longer prompts: only the short prompt's choices still share
    groups = shared_context_groups(requests, max_length=short_context + longest_choice - 1)
    assert [len(c) for c, _ in groups] == [short_context]
    one_token = [encode_pair(tok, "Pick:", c) for c in ["A", "B"]]
    assert shared_context_groups(one_token, max_length=512) == []  # shared by the identical-input path


def test_continuation_longer_than_max_length_is_rejected(tok, model):
    context, continuation = encode_pair(tok, "Q:", " a very long answer")
    with pytest.raises(ValueError, match="max_length"):
        score_requests(model, [(context, continuation)], max_length=4)


def test_choose_acc_and_acc_norm_disagree_on_long_choice():
    choices = [" no", " yes, absolutely, without any doubt"]
    logliks = [-6.0, -9.0]  # the long choice is less likely in total but far more likely per byte
    pred, pred_norm = choose(logliks, choices)
    assert (pred, pred_norm) == (0, 1)


def test_choose_normalises_by_utf8_bytes_not_characters():
    # " éé" is 3 characters but 5 bytes. Per byte: -4/5 = -0.8 beats -3/3 = -1.0, so choice 1;
    # per character it would be -4/3 = -1.33 against -1.0, choice 0.
    pred, pred_norm = choose([-3.0, -4.0], [" ab", " éé"])
    assert (pred, pred_norm) == (0, 1)


def test_choose_ties_go_to_first_index():
    assert choose([-1.0, -1.0, -1.0], [" a", " b", " c"]) == (0, 0)
    assert choose([-2.0, -1.0, -1.0], [" a", " b", " c"]) == (1, 1)


def test_evaluate_uses_byte_normalisation(monkeypatch, tok, model):
    fake = iter([[-6.0, -9.0]])
    monkeypatch.setattr("cotune.evaluation.multiple_choice.score_requests", lambda *a, **k: list(next(fake)))
    example = MCExample("Is it?", (" no", " yes, absolutely, without any doubt"), answer=1)
    result = evaluate_multiple_choice(model, tok, [example])
    assert (result.acc, result.acc_norm, result.n) == (0.0, 1.0, 1)
    assert result.logliks == [[-6.0, -9.0]]


class FavouriteTokens(nn.Module):
    """A stub LM whose next-token distribution strongly prefers a fixed set of tokens everywhere."""

    def __init__(self, vocab_size: int, favourite: list[int]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the scorer a device to read
        bias = torch.zeros(vocab_size)
        bias[favourite] = 20.0
        self.register_buffer("bias", bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.bias.expand(*input_ids.shape, -1) + self.anchor
        return SimpleNamespace(logits=logits)


def _yes_no_examples() -> list[MCExample]:
    return [
        MCExample("Q: is the sky blue?\nA:", (" yes", " no"), answer=0),
        MCExample("Q: is water wet?\nA:", (" no", " yes"), answer=1),
        MCExample("Q: is fire hot?\nA:", (" maybe", " no", " yes"), answer=2),
    ]


def test_model_preferring_the_answer_scores_full_accuracy(tok):
    examples = _yes_no_examples()
    right = FavouriteTokens(len(tok), tok.encode(" yes", add_special_tokens=False))
    result = evaluate_multiple_choice(right, tok, examples, batch_size=2)
    assert (result.acc, result.acc_norm, result.n) == (1.0, 1.0, 3)
    assert [len(row) for row in result.logliks] == [2, 2, 3]
    wrong = FavouriteTokens(len(tok), tok.encode(" no", add_special_tokens=False))
    assert evaluate_multiple_choice(wrong, tok, examples).acc == 0.0


def test_peft_model_with_fresh_adapter_matches_base(tok):
    base = build_tiny_model(TinyModelConfig(), len(tok)).eval()
    examples = _yes_no_examples()
    expected = evaluate_multiple_choice(base, tok, examples, batch_size=4)
    peft_model = get_peft_model(
        base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    got = evaluate_multiple_choice(peft_model, tok, examples, batch_size=4)
    flat = [s for row in got.logliks for s in row]
    torch.testing.assert_close(torch.tensor(flat), torch.tensor([s for row in expected.logliks for s in row]))
    assert (got.acc, got.acc_norm) == (expected.acc, expected.acc_norm)


def test_encode_pair_moves_trailing_whitespace_into_continuation(tok):
    context, continuation = encode_pair(tok, "Answer: ", "Paris")
    assert tok.decode(context) == "Answer:"
    assert tok.decode(continuation) == " Paris"


def test_encode_pair_bos_and_empty_prompt(tok):
    prefix = tok.eos_token_id  # the byte tokenizer has no BOS, so EOS stands in as in the harness
    context, continuation = encode_pair(tok, "Q:", " a", add_bos=True)
    assert context[0] == prefix and tok.decode(context[1:]) == "Q:"
    assert tok.decode(continuation) == " a"
    context, continuation = encode_pair(tok, "", "hello")
    assert context == [prefix] and tok.decode(continuation) == "hello"


class MergingTokenizer:
    """Characters as tokens, except "ab" which merges into one token, across any boundary."""

    bos_token_id = None
    eos_token_id = 0
    pad_token_id = None
    AB = 1000

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                ids.append(self.AB)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids


def test_encode_pair_falls_back_when_tokens_merge_across_boundary():
    tok = MergingTokenizer()
    # Joint encoding of "xa" + "bc" is [x, AB, c]: it does not start with [x, a], so encode "bc" alone.
    assert encode_pair(tok, "xa", "bc") == ([ord("x"), ord("a")], [ord("b"), ord("c")])
    # Without a merge the continuation is the tail of the joint encoding.
    assert encode_pair(tok, "xy", "ab") == ([ord("x"), ord("y")], [MergingTokenizer.AB])


@pytest.mark.parametrize(
    ("example", "message"),
    [
        (MCExample("Q:", (" only",), answer=0), "at least 2"),
        (MCExample("Q:", (), answer=0), "at least 2"),
        (MCExample("Q:", (" a", " b"), answer=2), "answer index 2"),
        (MCExample("Q:", (" a", " b"), answer=-1), "answer index -1"),
        (MCExample("Q:", (" a", ""), answer=0), "empty continuation"),
    ],
)
def test_bad_examples_raise(tok, model, example, message):
    with pytest.raises(ValueError, match=message):
        evaluate_multiple_choice(model, tok, [MCExample("ok", (" a", " b"), 0), example])


def test_no_examples_and_empty_continuation_raise(tok, model):
    with pytest.raises(ValueError, match="no multiple-choice examples"):
        evaluate_multiple_choice(model, tok, [])
    with pytest.raises(ValueError, match="no tokens"):
        encode_pair(tok, "Q:", "")
    with pytest.raises(ValueError, match="empty continuation"):
        score_requests(model, [([1, 2], [])])
