"""Generation data (P14): layouts, bad rows, the response-only loss mask, truncation, shipped tasks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError
from tests.test_cotuning import tree
from typer.testing import CliRunner

import cotune.runtime.embedded as embedded
from cotune.cli.main import app
from cotune.config.schema import ExperimentConfig, SourceConfig, TaskColumns, TaskConfig, TinyModelConfig
from cotune.data.corpora import Document
from cotune.data.errors import DataError
from cotune.data.generation import (
    DOCSTRING_INSTRUCTION,
    HEADLINE_INSTRUCTION,
    NO_LABEL,
    GenExample,
    dedupe_prompts,
    encode_request,
    fit_lengths,
    function_examples,
    gen_format,
    gen_requests,
    headline_examples,
    load_gen_file,
    shipped_task,
)
from cotune.data.task_data import build_task_data, encode_generation
from cotune.data.tasks import split_task
from cotune.evaluation.lm import IGNORE_INDEX
from cotune.models.tiny import EOS, build_tiny_model, byte_tokenizer

CANARY = "CANARY-5d1e-private-reply"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
runner = CliRunner()


def chatml_tokenizer():
    """The byte tokenizer with ChatML's two special tokens and template (as SmolLM2-Instruct has)."""
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# --- layouts ---------------------------------------------------------------------------------------


def test_the_three_layouts_read_into_prompt_response_label(tmp_path: Path) -> None:
    f = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "P", "response": "R", "label": "x"},
            {"instruction": "Do it", "input": "on this", "output": "done"},
            {"instruction": "Do it", "input": "  ", "output": "done"},  # blank input: instruction alone
            {"instruction": "Do it", "output": "done", "label": 7},
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "U1"},
                    {"role": "assistant", "content": "A1"},
                    {"role": "user", "content": "U2"},
                    {"role": "assistant", "content": "A2"},
                    {"role": "user", "content": "dropped: after the response"},
                ]
            },
        ],
    )
    ex = load_gen_file(f)
    assert ex[0] == GenExample("P", "R", "x")
    assert ex[1] == GenExample("Do it\n\non this", "done", NO_LABEL)
    assert ex[2] == GenExample("Do it", "done", NO_LABEL)
    assert ex[3].label == "7"
    assert ex[4] == GenExample("U2", "A2", NO_LABEL, (("system", "S"), ("user", "U1"), ("assistant", "A1")))
    assert ex[4].conversation()[-1] == {"role": "user", "content": "U2"}


def test_renamed_columns_and_a_stated_layout(tmp_path: Path) -> None:
    cols = TaskColumns(prompt="q", response="a", messages="turns")
    f = write_jsonl(tmp_path / "r.jsonl", [{"q": "Q", "a": "A", "turns": "ignored: layout prompt"}])
    assert load_gen_file(f, cols, layout="prompt") == [GenExample("Q", "A")]
    chat = write_jsonl(
        tmp_path / "c.jsonl",
        [{"turns": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}],
    )
    assert load_gen_file(chat, cols) == [GenExample("u", "a")]


def test_a_csv_table_in_each_layout(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    chat = tmp_path / "chat.csv"
    msgs = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    with chat.open("w", newline="") as out:
        csv.writer(out).writerows([["messages", "label"], [msgs, "t"]])
    assert load_gen_file(chat) == [GenExample("hi", "yo", "t")]
    alpaca = tmp_path / "alpaca.csv"
    alpaca.write_text("instruction,input,output\nSum,one two,three\n")
    assert load_gen_file(alpaca) == [GenExample("Sum\n\none two", "three")]


def test_csv_cells_that_look_numeric_stay_the_text_they_are(tmp_path: Path) -> None:
    """A CSV has no types: "42", "3.14", "007", "NA" in a text column are read as written (pandas would
    make numbers of the first three, a missing value of the last, and the rows were refused); labels too.
    Typed formats keep their types: a number where a text belongs is refused by row, never quoted."""
    pytest.importorskip("datasets")
    f = tmp_path / "numbers.csv"
    f.write_text("prompt,response,label\nSix times seven?,42,1\nPi?,3.14,2\nZip?,007,\nSay it,NA,1\n")
    assert load_gen_file(f) == [
        GenExample("Six times seven?", "42", "1"),
        GenExample("Pi?", "3.14", "2"),
        GenExample("Zip?", "007"),
        GenExample("Say it", "NA", "1"),
    ]
    alpaca = tmp_path / "alpaca.csv"
    alpaca.write_text("instruction,input,output\n7,,8\n")
    assert load_gen_file(alpaca) == [GenExample("7", "8")]
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps([{"prompt": CANARY, "response": 42}]))
    with pytest.raises(DataError) as err:
        load_gen_file(typed)
    assert f"{typed} row 1: 'response' must be a string, not int" in str(err.value)
    assert CANARY not in str(err.value)


# --- bad rows ---------------------------------------------------------------------------------------


def test_bad_rows_are_all_named_by_file_and_line_never_quoted(tmp_path: Path) -> None:
    f = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": CANARY},  # 1: no response
            {"prompt": "  ", "response": CANARY},  # 2: empty prompt
            {"prompt": CANARY, "response": 5},  # 3: wrong type
            {"messages": [{"role": "user", "content": CANARY}]},  # 4: no assistant turn
            {"prompt": "ok", "response": "ok"},  # 5: good
            "{" + CANARY,  # 6: not JSON
            {"messages": [{"role": CANARY, "content": "x"}, {"role": "assistant", "content": "y"}]},  # 7
        ],
    )
    with pytest.raises(DataError) as err:
        load_gen_file(f)
    text = str(err.value)
    assert text.startswith(f"6 bad row(s) in generation file {f}")
    assert f"{f}:1: no response ('response' is missing or null)" in text
    assert f"{f}:2: the prompt ('prompt') is empty" in text
    assert f"{f}:3: 'response' must be a string, not int" in text
    assert f"{f}:4: 'messages' has no assistant turn" in text
    assert f"{f}:6: invalid JSON" in text and f"{f}:7" not in text and "... and 1 more" in text  # 5 listed
    assert f"{f}:5" not in text
    assert CANARY not in text


def test_bad_table_rows_are_named_by_row(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    f = tmp_path / "bad.csv"
    f.write_text(f"prompt,response\n{CANARY},\n,{CANARY}\n")
    with pytest.raises(DataError) as err:
        load_gen_file(f)
    assert f"{f} row 1: no response" in str(err.value) and f"{f} row 2: no prompt" in str(err.value)
    assert CANARY not in str(err.value)
    missing = tmp_path / "cols.csv"
    missing.write_text("question,reply\na,b\n")
    with pytest.raises(DataError, match="no column 'prompt' for the prompt layout"):
        load_gen_file(missing)


def gen_tree(tmp_path: Path, clients: list[Path], public: Path, test: Path) -> dict:
    t = tree(Path("unused"), tmp_path, federation={"clients": len(clients)})
    t["task"] = {
        "kind": "generation",
        "clients": [str(c) for c in clients],
        "public": str(public),
        "test": str(test),
        "max_length": 64,
    }
    return t


def run_cli(tmp_path: Path, t: dict) -> tuple[int, str]:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(t))
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "runs" / "x")])
    return result.exit_code, " ".join(result.output.split())


def test_cli_names_every_bad_generation_file_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(embedded, "load_model", refuse)
    monkeypatch.setattr(embedded, "load_fedcollm_models", refuse)
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "response": "r"}] * 3)
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"prompt": "p", "response": "r"}, {"instruction": CANARY, "output": ""}, {"messages": CANARY}],
    )
    code, out = run_cli(tmp_path, gen_tree(tmp_path, [good, bad, tmp_path / "gone.jsonl"], good, good))
    assert code == 2, out
    assert "3 data problem(s)" in out
    assert f"task.clients[1]: {bad}:2: the response ('output') is empty" in out
    assert f"task.clients[1]: {bad}:3: 'messages' must be a non-empty list" in out
    assert "task.clients[2]" in out and "gone.jsonl: does not exist" in out
    assert CANARY not in out and "Traceback" not in out


# --- config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "extra", "message"),
    [
        (
            {"kind": "generation", "source": {"corpus": "bbc"}, "labels": ["tech", "business"]},
            {},
            "no choices",
        ),
        ({"kind": "generation", "source": {"corpus": "wikipedia"}}, {}, "has no generation task"),
        ({"path": "t.jsonl", "chat_template": "none"}, {}, "read by generation tasks only"),
        ({"path": "t.jsonl", "max_new_tokens": 9}, {}, "read by generation tasks only"),
        (
            {"kind": "generation", "path": "t.jsonl"},
            {"distill": {"kd_target": "choices"}},
            "kd_target 'vocab'",
        ),
    ],
)
def test_meaningless_generation_settings_are_refused(task: dict, extra: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ExperimentConfig.model_validate({"algorithm": "standalone", "task": task, **extra})


def test_cli_refuses_a_corpus_without_a_generation_task(tmp_path: Path) -> None:
    t = tree(Path("unused"), tmp_path)
    t["task"] = {"kind": "generation", "source": {"corpus": "wikipedia"}}
    code, out = run_cli(tmp_path, t)
    assert code == 2 and "corpus 'wikipedia' has no generation task" in out and "Traceback" not in out


# --- encoding -----------------------------------------------------------------------------------------


def test_plain_format_and_response_only_labels_on_the_tiny_tokenizer() -> None:
    tok = byte_tokenizer()  # no chat template: the plain format even with chat_template auto
    fmt = gen_format(tok, "auto")
    assert not fmt.template and fmt.stop_id == tok.convert_tokens_to_ids(EOS)
    req = encode_request(tok, GenExample("Hi", "Yo"), 64, fmt)
    assert tok.decode(req.prompt_ids) == "User:\nHi\n\nAssistant:\n" and len(req.prompt_ids) == 21
    assert tok.decode(req.response_ids) == "Yo" + EOS and len(req.response_ids) == 3
    assert req.reference == "Yo"
    data = encode_generation(tok, [GenExample("Hi", "Yo"), GenExample("Hello", "Y")], 64)
    assert data.input_ids.shape == (2, 26)  # row 0: 21 + 3; row 1: 24 + 2 ("Hello" is 3 bytes longer)
    assert data.labels[0].tolist() == [IGNORE_INDEX] * 21 + list(req.response_ids) + [IGNORE_INDEX] * 2
    assert data.attention_mask[0].tolist() == [1] * 24 + [0] * 2


def test_padding_is_masked_and_labelled_ignore() -> None:
    tok = byte_tokenizer()
    data = encode_generation(tok, [GenExample("Hi", "Yo"), GenExample("A", "B")], 64)
    # row 1: "User:\nA\n\nAssistant:\n" = 20 tokens + "B" + EOS = 22, padded to 24
    assert data.attention_mask[1].tolist() == [1] * 22 + [0] * 2
    assert data.labels[1].tolist()[20:] == [tok.encode("B")[0], tok.eos_token_id, IGNORE_INDEX, IGNORE_INDEX]
    assert data.input_ids[1, 22:].tolist() == [tok.pad_token_id] * 2


def test_chatml_template_and_its_end_of_turn_close_the_response() -> None:
    tok = chatml_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    fmt = gen_format(tok, "auto")
    assert fmt.template and fmt.stop_id == im_end
    req = encode_request(tok, GenExample("Hi", "Yo"), 64, fmt)
    assert tok.decode(req.prompt_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # <|im_start|> user \n H i <|im_end|> \n <|im_start|> assistant \n: 1 + 4 + 1 + 2 + 1 + 1 + 1 + 9 + 1
    assert len(req.prompt_ids) == 21
    assert list(req.response_ids) == [*tok.encode("Yo", add_special_tokens=False), im_end]
    data = encode_generation(tok, [GenExample("Hi", "Yo")], 64)
    assert data.labels[0].tolist() == [IGNORE_INDEX] * 21 + list(req.response_ids)
    plain = gen_format(tok, "none")  # the template is there but not used
    assert not plain.template and plain.stop_id == tok.eos_token_id


def test_chat_history_goes_through_the_template() -> None:
    tok = chatml_tokenizer()
    ex = GenExample("U2", "A2", history=(("system", "S"), ("user", "U1"), ("assistant", "A1")))
    req = gen_requests(tok, [ex], 128)[0]
    assert tok.decode(req.prompt_ids) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = gen_requests(tok, [ex], 128, "none")[0]
    assert (
        tok.decode(plain.prompt_ids)
        == "System:\nS\n\nUser:\nU1\n\nAssistant:\nA1\n\nUser:\nU2\n\nAssistant:\n"
    )


def test_truncation_rule() -> None:
    assert fit_lengths(10, 4, 20) == (10, 4)  # both fit: nothing cut
    assert fit_lengths(30, 4, 20) == (16, 4)  # long prompt: the response whole, the prompt the rest
    assert fit_lengths(30, 30, 20) == (10, 10)  # both long: the response keeps half of max_length
    assert fit_lengths(5, 30, 20) == (5, 15)  # short prompt: the response keeps what it leaves
    tok = byte_tokenizer()
    fmt = gen_format(tok)
    req = encode_request(tok, GenExample("abcdefghij" * 3, "0123456789" * 3), 40, fmt)
    # prompt "User:\n" + 30 + "\n\nAssistant:\n" = 49 tokens, response 31: both cut to 20
    assert tok.decode(req.prompt_ids) == "defghij\n\nAssistant:\n"  # its last 20 tokens: the start went
    assert tok.decode(req.response_ids) == ("0123456789" * 2)  # the response's end and EOS went
    assert req.reference == "0123456789" * 3


def test_no_prompt_token_contributes_to_the_loss() -> None:
    """The gradient of the loss reaches the logits only at the positions that predict response tokens:
    it would reach prompt positions too if any prompt token were a target."""
    tok = byte_tokenizer()
    model = build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), len(tok)
    )
    data = encode_generation(tok, [GenExample("Hi there", "Yo"), GenExample("Q", "Answer")], 64)
    batch = data.batch(torch.arange(2), torch.device("cpu"))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.logits.retain_grad()
    out.loss.backward()
    touched = out.logits.grad.abs().sum(-1) > 0  # (2, L): logit rows the loss depends on
    n_prompt = [
        len(tok.encode("User:\nHi there\n\nAssistant:\n")),
        len(tok.encode("User:\nQ\n\nAssistant:\n")),
    ]
    n_response = [3, 7]  # "Yo" + EOS, "Answer" + EOS
    for r in range(2):
        expected = [n_prompt[r] - 1 <= t < n_prompt[r] - 1 + n_response[r] for t in range(touched.shape[1])]
        assert touched[r].tolist() == expected
    # and the loss is the mean cross-entropy of the response tokens alone (hand-computed from the logits)
    logp = torch.log_softmax(out.logits.detach(), -1)
    terms = [
        -logp[r, t - 1, batch["input_ids"][r, t]]
        for r in range(2)
        for t in range(n_prompt[r], n_prompt[r] + n_response[r])
    ]
    assert torch.allclose(out.loss.detach(), torch.stack(terms).mean(), atol=1e-6)


# --- shipped tasks --------------------------------------------------------------------------------


def test_headline_rule_and_duplicates() -> None:
    docs = [
        Document("Title one\n\nBody  of\nthe first.", "tech", "bbc"),
        Document("Other title\n\nBody  of\nthe first.", "sport", "bbc"),  # same body: a duplicate prompt
        Document("No body at all", "tech", "bbc"),  # skipped: no body
        Document("Third\nshort", "sport", "bbc"),
    ]
    built = dedupe_prompts(headline_examples(docs))
    assert built.duplicates == 1
    assert built.examples == [
        GenExample(HEADLINE_INSTRUCTION + "Body of the first.", "Title one", "tech"),
        GenExample(HEADLINE_INSTRUCTION + "short", "Third", "sport"),
    ]


MODULE = '''
import functools


def add(a, b):
    """Add two numbers.

    More text.
    """
    # the sum
    return a + b


class K:
    @functools.cache
    def method(self):
        """

        Return one."""
        return 1

    def only_doc(self):
        """Skipped: nothing but a docstring."""

    def no_doc(self):
        return 2

    def same_line(self): """Skipped: on the def line."""; return 3
'''


def test_docstring_rule() -> None:
    got = list(function_examples(MODULE, "mod"))
    assert got == [
        GenExample(
            DOCSTRING_INSTRUCTION + "def add(a, b):\n    # the sum\n    return a + b",
            "Add two numbers.",
            "mod",
        ),
        GenExample(DOCSTRING_INSTRUCTION + "def method(self):\n    return 1", "Return one.", "mod"),
    ]
    assert list(function_examples("def broken(:\n", "mod")) == []
    # a long function keeps its first whole lines within max_chars (the signature always)
    cut = next(function_examples(MODULE, "mod", max_chars=20))
    assert cut.prompt == DOCSTRING_INSTRUCTION + "def add(a, b):"


def test_shipped_tasks_are_deterministic_and_labelled() -> None:
    bbc = SourceConfig(corpus="bbc", max_docs=30)
    first, second = shipped_task(bbc), shipped_task(bbc)
    assert first == second and len(first.examples) + first.duplicates + first.duplicate_documents == 150
    assert sorted({e.label for e in first.examples}) == [
        "business",
        "entertainment",
        "politics",
        "sports",
        "tech",
    ]
    assert all(e.prompt.startswith(HEADLINE_INSTRUCTION) and "\n" not in e.response for e in first.examples)
    py = SourceConfig(corpus="python", labels=["json", "shlex"])
    a, b = shipped_task(py), shipped_task(py)
    assert a == b and {e.label for e in a.examples} == {"json", "shlex"}
    assert all(e.response and "\n" not in e.response for e in a.examples)


def test_full_bbc_headlines_drop_duplicated_articles() -> None:
    built = shipped_task(SourceConfig(corpus="bbc"))
    assert built.duplicate_documents > 0 and len({e.prompt for e in built.examples}) == len(built.examples)
    # every BBC file has a title and a body
    assert len(built.examples) + built.duplicates + built.duplicate_documents == 2225


# --- task data --------------------------------------------------------------------------------------


def gen_file(path: Path, n: int = 40) -> Path:
    rows = [{"prompt": f"say {i}", "response": f"{i}", "label": "ab"[i % 2]} for i in range(n)]
    return write_jsonl(path, rows)


def test_a_generation_task_splits_by_label_and_trains_on_responses(tmp_path: Path) -> None:
    f = gen_file(tmp_path / "g.jsonl")
    cfg = TaskConfig(kind="generation", path=f, max_length=32, partition={"kind": "one_label"})
    tok = byte_tokenizer()
    data = build_task_data(cfg, 2, tok, seed=0, public_val_fraction=0.25)
    again = build_task_data(cfg, 2, tok, seed=0, public_val_fraction=0.25)
    assert data.test == again.test and torch.equal(data.clients[0].input_ids, again.clients[0].input_ids)
    assert [sorted({e.label for e in part}) for part in data.splits.clients] == [["a"], ["b"]]
    assert all(isinstance(e, GenExample) for e in data.test) and len(data.test) == 8  # 20% of each label
    assert data.public.choices is None
    for part, encoded in zip(data.splits.clients, data.clients, strict=True):
        for ex, labels in zip(part, encoded.labels, strict=True):
            target = [t for t in labels.tolist() if t != IGNORE_INDEX]
            assert target == [*tok.encode(ex.response), tok.eos_token_id]
    # the same split as a multiple-choice task of the same labels gets (split_task is one function)
    rng = np.random.default_rng(0)
    same = split_task(load_gen_file(f), 2, 0.2, cfg.partition, rng)
    assert same.clients == data.splits.clients


def test_owned_generation_files(tmp_path: Path) -> None:
    files = [gen_file(tmp_path / f"c{i}.jsonl", 6) for i in range(2)]
    public, test = gen_file(tmp_path / "pub.jsonl", 4), gen_file(tmp_path / "test.jsonl", 4)
    cfg = TaskConfig(kind="generation", clients=files, public=public, test=test, chat_template="none")
    data = build_task_data(cfg, 2, byte_tokenizer(), seed=0)
    assert (
        [len(c) for c in data.clients] == [6, 6] and len(data.test) == 4 and data.splits.labels == ["a", "b"]
    )


def test_a_saved_task_clients_config_loads_back(tmp_path: Path) -> None:
    """A run's config.yaml spells out task.partition and task.test_fraction at their defaults: with
    task.clients it must load back (resume, cotune eval, the config a Flower ServerApp sends its nodes);
    either set away from its default beside task.clients is still refused."""
    from cotune.config import ConfigError, config_from_dict, dump_config

    files = [gen_file(tmp_path / f"c{i}.jsonl", 6) for i in range(2)]
    public, test = gen_file(tmp_path / "pub.jsonl", 4), gen_file(tmp_path / "test.jsonl", 4)
    cfg = config_from_dict(gen_tree(tmp_path, files, public, test))
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    for extra in ({"test_fraction": 0.3}, {"partition": {"kind": "iid"}}):
        t = gen_tree(tmp_path, files, public, test)
        t["task"] |= extra
        with pytest.raises(ConfigError, match=r"task\.clients is already split by owner"):
            config_from_dict(t)


def test_a_template_that_refuses_a_conversation_is_a_data_error_without_its_text() -> None:
    tok = chatml_tokenizer()
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception(messages[0]['content']) }}{% endif %}"
        + CHATML
    )
    with pytest.raises(DataError, match="chat template refused a conversation") as err:
        gen_requests(tok, [GenExample("u", "a", history=(("system", CANARY),))], 64)
    assert CANARY not in str(err.value)
