"""Generation evaluation: what a model generates for a prompt, judged against the reference response.

`GenRequest` is the one form in which an example reaches the evaluator (the data layer builds it, with
the tokenizer's chat template applied or not); decoding and scoring live beside it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenRequest:
    """One generation example as token ids.

    `prompt_ids`: everything the model is given (chat template and generation prompt included, already
    cut to fit); `response_ids`: the reference response's tokens, closed by the stop token (EOS or the
    template's end-of-turn), which training learns and perplexity scores; `reference`: the response's
    text, what generated text is compared with.
    """

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    reference: str
