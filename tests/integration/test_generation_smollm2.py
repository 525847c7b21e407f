"""Generation data with SmolLM2-135M-Instruct's own tokenizer: its ChatML template, <|im_end|> as the
response's stop token, and the loss on the response tokens only."""

from __future__ import annotations

import pytest
import torch

from cotune.config.schema import ModelConfig
from cotune.data.generation import GenExample, gen_format, gen_requests
from cotune.data.task_data import encode_generation
from cotune.evaluation.lm import IGNORE_INDEX
from cotune.models.loader import load_base_model

pytestmark = pytest.mark.integration

SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    _, tok = load_base_model(ModelConfig(name="smollm2-135m-instruct"), torch.device("cpu"), torch.float32)
    return tok


def test_chatml_prompt_and_im_end_close_the_response(tokenizer) -> None:
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert gen_format(tokenizer).stop_id == im_end
    ex = GenExample("Name a colour.", "Blue.")
    req = gen_requests(tokenizer, [ex], 256)[0]
    # the template's default system turn, the user turn, the generation prompt
    assert tokenizer.decode(req.prompt_ids) == (
        SYSTEM + "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert list(req.response_ids) == [*tokenizer.encode("Blue.", add_special_tokens=False), im_end]
    data = encode_generation(tokenizer, [ex, GenExample("Hi", "Hello there, friend.")], 256)
    for row, r in enumerate(gen_requests(tokenizer, [ex, GenExample("Hi", "Hello there, friend.")], 256)):
        n = len(r.prompt_ids)
        labels = data.labels[row].tolist()
        assert labels[:n] == [IGNORE_INDEX] * n
        assert labels[n : n + len(r.response_ids)] == list(r.response_ids)
        assert all(t == IGNORE_INDEX for t in labels[n + len(r.response_ids) :])


def test_plain_format_with_smollm2_stops_at_its_eos(tokenizer) -> None:
    req = gen_requests(tokenizer, [GenExample("Hi", "Yo")], 64, "none")[0]
    assert tokenizer.decode(req.prompt_ids) == "User:\nHi\n\nAssistant:\n"
    assert req.response_ids[-1] == tokenizer.eos_token_id
