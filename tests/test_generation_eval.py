"""Generation evaluation: text scores on fixed strings, batched greedy decoding equal to one-by-one
`generate`, left padding and position ids, and the reference responses' perplexity by hand."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from rouge_score import rouge_scorer
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from cotune.config.loader import config_from_dict
from cotune.config.schema import TinyModelConfig
from cotune.evaluation.generation import (
    GenRequest,
    evaluate_generation,
    exact_match,
    generation_count,
    greedy_decode,
    normalize_answer,
    pad_token_id,
    response_nll,
    rouge_l,
    stop_token_ids,
    token_f1,
)
from cotune.models.lora import AdapterPool, lora_config
from cotune.models.tiny import build_tiny_model, byte_tokenizer

TEXTS = [
    "hello",
    "A much longer prompt, with many more tokens than any other prompt in this batch: " * 3,
    "xy",
    "the quick brown fox",
    "Q: what is two plus two?\nA:",
]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def lively(tok) -> nn.Module:
    """The tiny model with its weight matrices scaled 10x: at its initialisation greedy decoding repeats
    one token whatever the prompt, which would hide wrong positions or padding; scaled, the tokens
    follow the input."""
    model = build_tiny_model(TinyModelConfig(), len(tok)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(10)
    return model


@pytest.fixture(scope="module")
def model(tok):
    return lively(tok)


def one_by_one(model: nn.Module, prompts, max_new_tokens: int, stop_ids, pad_id: int) -> list[list[int]]:
    """The reference: `generate(do_sample=False)` on each prompt alone, the stop token cut off."""
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
        )
        new = out[0, len(p) :].tolist()
        outs.append(new[: next((i for i, t in enumerate(new) if t in stop_ids), len(new))])
    return outs


# ---- text scores ---------------------------------------------------------------------------------------
def test_normalisation_is_squads():
    assert normalize_answer("  The Cat, sat!  on A mat. ") == "cat sat on mat"
    assert normalize_answer("An apple-pie") == "applepie"  # punctuation is dropped, not a separator
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match():
    assert exact_match("The cat.", "cat") == 1.0
    assert exact_match("cat", "dog") == 0.0
    assert exact_match("", "") == 1.0
    assert exact_match("the", "") == 1.0  # both normalise to nothing
    assert exact_match("", "cat") == 0.0


def test_token_f1_by_hand():
    # pred {cat, sat, on, mat} vs ref {cat, on, mat}: 3 shared, P = 3/4, R = 1 -> 6/7
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # repeated words count once per occurrence on both sides: 1 shared, P = 1/3, R = 1/2 -> 0.4
    assert token_f1("cat cat cat", "cat dog") == pytest.approx(0.4)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("Cat!", "the cat") == 1.0
    assert token_f1("", "") == 1.0
    assert token_f1("", "cat") == 0.0
    assert token_f1("cat", "") == 0.0


def test_rouge_l_by_hand():
    # LCS "the cat on the mat" = 5 of 6 words on each side -> P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat was on the mat") == pytest.approx(5 / 6)
    # LCS of [police kill the gunman] and [the gunman kill police] is 2 -> 0.5
    assert rouge_l("police kill the gunman", "the gunman kill police") == pytest.approx(0.5)
    assert rouge_l("The Cat!", "the cat") == 1.0
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("anything", "") == 0.0
    # no stemmer: "cats" is not "cat"; 1 of 2 words shared -> 0.5
    assert rouge_l("cats sleep", "cat sleep") == pytest.approx(0.5)


def test_rouge_l_matches_the_library_default_on_ascii_and_keeps_other_scripts():
    default = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for pred, ref in [
        ("Police kill the gunman, 3 say.", "the gunman kill police"),
        ("under_score and dash-case", "dash case under score"),
        ("Markets rally as rates fall", "Rates fall; markets rally!"),
    ]:
        assert rouge_l(pred, ref) == pytest.approx(default.score(ref, pred)["rougeL"].fmeasure)
    # [übermut tut selten gut] vs [übermut tut gut]: LCS 3, P = 3/4, R = 1 -> 6/7
    assert rouge_l("Übermut tut selten gut", "übermut tut gut") == pytest.approx(6 / 7)
    assert rouge_l("καλημέρα κόσμε", "καλημέρα") == pytest.approx(2 / 3)  # the default tokenizer gives 0


# ---- decoding ------------------------------------------------------------------------------------------
def test_batched_decoding_equals_one_by_one_generate(tok, model):
    prompts = [tok.encode(t) for t in TEXTS]
    stop = [tok.eos_token_id]
    expected = one_by_one(model, prompts, 12, stop, tok.pad_token_id)
    for batch_size in (1, 2, 8):
        got = greedy_decode(
            model, prompts, batch_size=batch_size, max_new_tokens=12, stop_ids=stop, pad_id=tok.pad_token_id
        )
        assert got == expected


def _early_stop(outputs: list[list[int]]) -> int:
    """A token that the first row produces at its 5th step and not before: a stop id ending it early."""
    for j in range(3, len(outputs[0])):
        if outputs[0][j] not in outputs[0][:j]:
            return outputs[0][j]
    raise AssertionError("no token to stop on")


def test_a_row_that_stops_early_leaves_the_others_unchanged(tok, model):
    prompts = [tok.encode(t) for t in TEXTS]
    free = greedy_decode(model, prompts, max_new_tokens=16, stop_ids=[], pad_id=tok.pad_token_id)
    stop = [_early_stop(free), tok.eos_token_id]
    expected = one_by_one(model, prompts, 16, stop, tok.pad_token_id)
    got = greedy_decode(
        model, prompts, batch_size=8, max_new_tokens=16, stop_ids=stop, pad_id=tok.pad_token_id
    )
    assert got == expected
    assert 3 <= len(got[0]) < 16 and stop[0] not in got[0]  # stopped, the stop token left out
    assert any(len(g) == 16 for g in got)  # others ran to max_new_tokens
    for g, f in zip(got, free, strict=True):
        assert g == f[: len(g)]


def test_left_padding_and_positions_a_prompt_decodes_the_same_beside_a_much_longer_one(tok, model):
    short, long = tok.encode("hi there"), tok.encode("a very long prompt " * 12)
    alone = greedy_decode(model, [short], max_new_tokens=10, pad_id=tok.pad_token_id)
    together = greedy_decode(model, [long, short], batch_size=2, max_new_tokens=10, pad_id=tok.pad_token_id)
    assert together[1] == alone[0]
    assert together[0] == greedy_decode(model, [long], max_new_tokens=10, pad_id=tok.pad_token_id)[0]


def test_position_ids_count_from_each_rows_first_token(tok):
    """RoPE (the tiny Llama) is blind to a shift of all positions, so wrong position ids of a left-padded
    row (counting from the padding) show only on a model with learned absolute positions: a tiny GPT-2."""
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in gpt2.parameters():
            if param.dim() == 2:
                param.mul_(10)  # tokens that follow the input (see `lively`)
    short, long = tok.encode("hi there"), tok.encode("a very long prompt " * 12)
    alone = one_by_one(gpt2, [short], 10, [], tok.pad_token_id)
    assert (
        greedy_decode(gpt2, [long, short], batch_size=2, max_new_tokens=10, pad_id=tok.pad_token_id)[1]
        == alone[0]
    )


def _lora_settings():
    return config_from_dict({"model": {"name": "tiny"}, "lora": {"dropout": 0.0}}).lora


def _randomised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in state.items()}


def test_peft_model_and_adapter_pool_views_decode_as_generate(tok):
    prompts = [tok.encode(t) for t in TEXTS]
    base = lively(tok)
    pool = AdapterPool(base, _lora_settings(), ["c0", "c1"])
    pool.load_state("c1", _randomised(dict(pool.state("c1"))))
    pool.activate("c1")
    stop = [tok.eos_token_id]
    expected = one_by_one(pool.model, prompts, 10, stop, tok.pad_token_id)
    got = greedy_decode(
        pool.model, prompts, batch_size=4, max_new_tokens=10, stop_ids=stop, pad_id=tok.pad_token_id
    )
    assert got == expected
    pool.activate("c0")  # B = 0: the base model's tokens
    assert greedy_decode(pool.model, prompts, max_new_tokens=10, pad_id=tok.pad_token_id) != got

    peft = get_peft_model(lively(tok), lora_config(_lora_settings())).eval()
    state = {k: v for k, v in peft.state_dict().items() if "lora_" in k}
    peft.load_state_dict(_randomised(state), strict=False)
    expected = one_by_one(peft, prompts, 10, stop, tok.pad_token_id)
    assert greedy_decode(
        peft, prompts, batch_size=3, max_new_tokens=10, stop_ids=stop, pad_id=tok.pad_token_id
    ) == (expected)


class NoCacheLM(nn.Module):
    """A model that is not a transformers model (no config): decoded prompt by prompt, no cache."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor):
        return self.inner(input_ids=input_ids)


def test_models_without_a_kv_cache_decode_the_same_tokens(tok, model):
    prompts = [tok.encode(t) for t in TEXTS]
    kept = greedy_decode(
        model, prompts, max_new_tokens=8, stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id
    )
    done: list[int] = []
    plain = greedy_decode(
        NoCacheLM(model),
        prompts,
        batch_size=2,
        max_new_tokens=8,
        stop_ids=[tok.eos_token_id],
        on_done=done.append,
    )
    assert plain == kept
    assert done == [2, 2, 1]


def test_decoding_refuses_meaningless_settings(tok, model):
    with pytest.raises(ValueError, match="empty prompt"):
        greedy_decode(model, [tok.encode("a"), []])
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(model, [tok.encode("a")], max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        greedy_decode(model, [tok.encode("a")], batch_size=0)


# ---- perplexity and the entry point --------------------------------------------------------------------
def _requests(tok) -> list[GenRequest]:
    pairs = [
        ("Headline: rates rise\n", "Bank lifts rates"),
        ("hi", "hello there friend"),
        ("Q: 2+2?\nA:", " 4"),
    ]
    return [GenRequest(tuple(tok.encode(p)), (*tok.encode(r), tok.eos_token_id), r) for p, r in pairs]


def test_reference_perplexity_by_hand(tok, model):
    requests = _requests(tok)
    total, count = 0.0, 0
    for req in requests:  # one unpadded forward each; log-softmax; the response tokens picked by hand
        ids = torch.tensor([[*req.prompt_ids, *req.response_ids]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        for j, token in enumerate(req.response_ids):
            total -= float(logprobs[len(req.prompt_ids) - 1 + j, token])
            count += 1
    scores = response_nll(model, requests, batch_size=2, pad_id=tok.pad_token_id)
    assert [n for _, n in scores] == [len(r.response_ids) for r in requests]  # the stop token included
    assert sum(loss for loss, _ in scores) == pytest.approx(total, rel=1e-5)
    res = evaluate_generation(
        model,
        requests,
        batch_size=2,
        max_new_tokens=4,
        stop_ids=[tok.eos_token_id],
        pad_id=tok.pad_token_id,
        decode=tok.decode,
    )
    assert res.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_evaluate_generation_scores_the_decoded_text(tok, model):
    requests = _requests(tok)
    stop = [tok.eos_token_id]
    done: list[int] = []
    res = evaluate_generation(
        model,
        requests,
        batch_size=2,
        max_new_tokens=6,
        stop_ids=stop,
        pad_id=tok.pad_token_id,
        decode=tok.decode,
        on_done=done.append,
    )
    tokens = greedy_decode(
        model, [r.prompt_ids for r in requests], max_new_tokens=6, stop_ids=stop, pad_id=tok.pad_token_id
    )
    assert res.predictions == [tok.decode(t) for t in tokens]
    pairs = list(zip(res.predictions, [r.reference for r in requests], strict=True))
    assert res.n == 3 and sum(done) == 3 == generation_count(requests)
    assert res.exact_match == pytest.approx(sum(exact_match(p, r) for p, r in pairs) / 3)
    assert res.f1 == pytest.approx(sum(token_f1(p, r) for p, r in pairs) / 3)
    assert res.rouge_l == pytest.approx(sum(rouge_l(p, r) for p, r in pairs) / 3)
    again = evaluate_generation(
        model,
        requests,
        batch_size=3,
        max_new_tokens=6,
        stop_ids=stop,
        pad_id=tok.pad_token_id,
        decode=tok.decode,
    )
    assert again == res  # deterministic, and the batch size changes nothing


def test_max_examples_bounds_the_evaluation(tok, model):
    requests = _requests(tok)
    done: list[int] = []
    res = evaluate_generation(
        model,
        requests,
        max_new_tokens=3,
        stop_ids=[],
        pad_id=tok.pad_token_id,
        decode=tok.decode,
        max_examples=2,
        on_done=done.append,
    )
    assert res.n == 2 == sum(done) == generation_count(requests, 2) and len(res.predictions) == 2
    with pytest.raises(ValueError, match="no generation examples"):
        evaluate_generation(model, [], stop_ids=[], pad_id=0, decode=tok.decode)


def test_a_reference_perplexity_the_caller_scored_is_taken_as_it_is(tok, model):
    """The caller's figure for these very requests replaces the second teacher-forced pass; the text
    scores stay as they are, and a figure over all requests cannot stand for the first few."""
    requests = _requests(tok)
    kwargs = {"max_new_tokens": 3, "stop_ids": [], "pad_id": tok.pad_token_id, "decode": tok.decode}
    scored = evaluate_generation(model, requests, **kwargs)
    given = evaluate_generation(model, requests, reference_ppl=12.5, **kwargs)
    assert given.ppl == 12.5 and given.predictions == scored.predictions and given.rouge_l == scored.rouge_l
    with pytest.raises(ValueError, match="reference_ppl"):
        evaluate_generation(model, requests, reference_ppl=12.5, max_examples=2, **kwargs)


def test_stop_and_pad_ids(tok, model):
    from types import SimpleNamespace

    assert stop_token_ids(model, tok) == sorted({2, tok.eos_token_id})  # LlamaConfig's EOS 2 and the byte EOS
    many = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 5]))
    assert stop_token_ids(many, SimpleNamespace(eos_token_id=5)) == [5, 7]
    assert stop_token_ids(nn.Linear(1, 1), SimpleNamespace(eos_token_id=None)) == []
    assert pad_token_id(tok) == tok.pad_token_id
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=3)) == 3
    assert pad_token_id(SimpleNamespace()) == 0
