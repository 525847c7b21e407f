"""Multiple-choice tasks: prompts carry the article, splits never share an example, loss is on the answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cotune.config.schema import PartitionConfig, SourceConfig
from cotune.data.corpora import DataError, Document
from cotune.data.tasks import (
    IGNORE_INDEX,
    TOPIC_TEMPLATES,
    TaskExample,
    build_task,
    encode_for_training,
    example_label,
    load_jsonl_task,
    split_task,
    topic_task,
    truncate_words,
)
from cotune.evaluation.multiple_choice import MCExample, encode_pair
from cotune.models.tiny import EOS, byte_tokenizer

BBC = ["tech", "business", "sports", "politics", "entertainment"]


def _docs(per_label: int = 3) -> list[Document]:
    return [
        Document(f"{label} story number {i}.\nSecond line about {label}.", label, "bbc")
        for label in BBC
        for i in range(per_label)
    ]


def _examples(labels: dict[str, int]) -> list[MCExample]:
    """Plain evaluator examples (no label field): splits label them by their stripped answer."""
    names = sorted(labels)
    return [
        MCExample(f"Q{name}{i}:", tuple(f" {n}" for n in names), names.index(name))
        for name, count in labels.items()
        for i in range(count)
    ]


def test_task_example_is_an_evaluator_example_with_a_label():
    ex = TaskExample("Q:", [" yes ", " no"], 0)  # type: ignore[arg-type]
    assert isinstance(ex, MCExample)
    assert ex.choices == (" yes ", " no") and ex.label == "yes"
    assert TaskExample("Q:", (" a", " b"), 1, label="B").label == "B"
    with pytest.raises(ValueError, match="at least 2"):
        TaskExample("Q:", (" a",), 0)
    with pytest.raises(ValueError, match="out of range"):
        TaskExample("Q:", (" a", " b"), 2)


# --- topic task -----------------------------------------------------------------------------------


def test_topic_task_prompt_choices_and_answer():
    docs = _docs()
    task = topic_task(docs)
    assert len(task) == len(docs)
    expected = (" business", " entertainment", " politics", " sports", " tech")
    for doc, ex in zip(docs, task, strict=True):
        assert ex.choices == expected
        assert ex.choices[ex.answer] == f" {doc.label}"
        assert ex.label == doc.label
        assert " ".join(doc.text.split()) in ex.prompt
        assert ex.prompt.startswith("Article: ")
        assert "Options: business, entertainment, politics, sports, tech.\n" in ex.prompt
        assert ex.prompt.endswith("\nAnswer:")


def test_topic_task_truncates_on_a_word_boundary():
    doc = Document("alpha beta gamma delta epsilon", "tech", "bbc")
    other = Document("x", "sports", "bbc")
    ex = topic_task([doc, other], max_chars=13)[0]
    assert "Article: alpha beta\n" in ex.prompt  # "alpha beta ga" would split "gamma"
    assert truncate_words("alpha beta gamma", 10) == "alpha beta"  # cut exactly at a word end
    assert truncate_words("alpha beta", 100) == "alpha beta"
    assert truncate_words("abcdefghij", 4) == "abcd"  # one long word is cut hard


def test_topic_task_configured_labels_order_and_filter():
    docs = _docs(1)
    task = topic_task(docs, labels=["tech", "sports"])
    assert [ex.label for ex in task] == ["tech", "sports"]
    assert task[0].choices == (" tech", " sports")
    assert [ex.answer for ex in task] == [0, 1]


def test_topic_task_other_prompt_language():
    ex = topic_task(_docs(1), template=TOPIC_TEMPLATES["fr"])[0]
    assert ex.prompt.startswith("Article : ") and ex.prompt.endswith("Réponse :")


# --- JSONL ----------------------------------------------------------------------------------------


def _write(tmp_path: Path, rows: list[object | str]) -> Path:
    path = tmp_path / "task.jsonl"
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_answer_as_index_and_as_string(tmp_path):
    path = _write(
        tmp_path,
        [
            {"prompt": "Capital of France?", "choices": [" Paris", " Rome"], "answer": 0},
            "",
            {"prompt": "2+2=", "choices": [" 3", " 4", " 5"], "answer": " 4"},
            {"prompt": "Sky?", "choices": [" blue", " green"], "answer": "green", "label": "colour"},
        ],
    )
    task = load_jsonl_task(path)
    assert [ex.answer for ex in task] == [0, 1, 1]
    assert [ex.label for ex in task] == ["Paris", "4", "colour"]
    assert task[1].choices == (" 3", " 4", " 5")
    assert build_task(path=path) == task


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "invalid JSON"),
        ([1, 2], "expected a JSON object"),
        ({"choices": [" a", " b"], "answer": 0}, "'prompt'"),
        ({"prompt": "q", "choices": " a", "answer": 0}, "'choices' must be a list"),
        ({"prompt": "q", "choices": [" a"], "answer": 0}, "at least 2"),
        ({"prompt": "q", "choices": [" a", " b"], "answer": 2}, "out of range"),
        ({"prompt": "q", "choices": [" a", " b"], "answer": -1}, "out of range"),
        ({"prompt": "q", "choices": [" a", " b"], "answer": "c"}, "not one of"),
        ({"prompt": "q", "choices": [" a", " b"], "answer": True}, "'answer' must be"),
        ({"prompt": "q", "choices": [" a", " b"]}, "'answer' must be"),
        ({"prompt": "q", "choices": [" a", " a"], "answer": 0}, "distinct"),
        ({"prompt": "q", "choices": [" a", " b"], "answer": 0, "label": 3}, "'label'"),
    ],
)
def test_jsonl_malformed_lines_name_file_and_line(tmp_path, bad, message):
    good = {"prompt": "q", "choices": [" a", " b"], "answer": 0}
    path = _write(tmp_path, [good, bad])
    with pytest.raises(DataError, match=message) as err:
        load_jsonl_task(path)
    assert f"{path}:2:" in str(err.value)


def test_jsonl_empty_file(tmp_path):
    path = _write(tmp_path, [""])
    with pytest.raises(DataError, match="no examples"):
        load_jsonl_task(path)


def test_build_task_needs_exactly_one_input():
    with pytest.raises(ValueError, match="exactly one"):
        build_task()


# --- splits ---------------------------------------------------------------------------------------

COUNTS = {"a": 23, "b": 17, "c": 20, "d": 20}


def _ids(examples: list[MCExample]) -> list[int]:
    return [id(ex) for ex in examples]


def _check_disjoint_cover(examples: list[MCExample], s) -> None:
    every = _ids(s.public) + [i for c in s.clients for i in _ids(c)] + _ids(s.test)
    assert len(every) == len(set(every)) == len(examples)
    assert set(every) == set(_ids(examples))


def test_iid_split_is_k_plus_one_equal_parts_and_stratified_test():
    examples = _examples(COUNTS)
    s = split_task(examples, 4, 0.2, None, np.random.default_rng(0))
    _check_disjoint_cover(examples, s)
    sizes = [len(s.public)] + [len(c) for c in s.clients]
    assert len(sizes) == 5 and max(sizes) - min(sizes) <= 1
    test_counts = {lab: sum(example_label(ex) == lab for ex in s.test) for lab in COUNTS}
    assert test_counts == {"a": 5, "b": 3, "c": 4, "d": 4}  # round(0.2 * n) of each label
    assert s.labels == ["a", "b", "c", "d"]
    assert s.mixtures.shape == (4, 4)
    np.testing.assert_allclose(s.mixtures.sum(axis=1), 1.0)


def test_iid_partition_config_equals_none():
    examples = _examples(COUNTS)
    a = split_task(examples, 3, 0.1, None, np.random.default_rng(5))
    b = split_task(examples, 3, 0.1, PartitionConfig(kind="iid"), np.random.default_rng(5))
    assert _ids(a.public) == _ids(b.public) and [_ids(c) for c in a.clients] == [_ids(c) for c in b.clients]


def test_split_is_deterministic_for_a_seed():
    examples = _examples(COUNTS)
    cfg = PartitionConfig(kind="dirichlet", alpha=1.0)

    def run(seed: int) -> list[list[int]]:
        s = split_task(examples, 3, 0.25, cfg, np.random.default_rng(seed))
        return [_ids(s.public), _ids(s.test)] + [_ids(c) for c in s.clients]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_one_label_split_gives_each_client_one_label():
    examples = _examples(COUNTS)
    s = split_task(examples, 4, 0.2, PartitionConfig(kind="one_label"), np.random.default_rng(1))
    _check_disjoint_cover(examples, s)
    assert [{example_label(ex) for ex in c} for c in s.clients] == [{"a"}, {"b"}, {"c"}, {"d"}]
    np.testing.assert_allclose(s.mixtures, np.eye(4))
    n_train = len(examples) - len(s.test)
    assert len(s.public) == len(np.array_split(np.arange(n_train), 5)[0])
    assert len({example_label(ex) for ex in s.public}) > 1  # the public set stays an IID share


def test_public_share_sets_the_public_size():
    examples = _examples(COUNTS)
    cfg = PartitionConfig(kind="mixed")
    s = split_task(examples, 4, 0.0, cfg, np.random.default_rng(0), public_share=0.5)
    _check_disjoint_cover(examples, s)
    assert s.test == [] and len(s.public) == 40


def test_split_rejects_too_little_data():
    with pytest.raises(DataError, match="cannot make a public set"):
        split_task(_examples({"a": 2, "b": 2}), 4, 0.0, None, np.random.default_rng(0))


# --- tokenisation ---------------------------------------------------------------------------------


def _answer_text(tok, labels_row: torch.Tensor) -> str:
    return tok.decode(labels_row[labels_row != IGNORE_INDEX].tolist())


def test_encode_masks_prompt_and_padding_and_keeps_the_answer():
    tok = byte_tokenizer()
    examples = [
        MCExample("Question: short?\nAnswer:", (" yes", " no"), 1),
        MCExample("A much longer question prompt here?\nAnswer: ", ("maybe", "surely not"), 1),
    ]
    ids, mask, labels = encode_for_training(tok, examples, max_length=128)
    assert ids.shape == mask.shape == labels.shape
    assert ids.shape[1] == int(mask.sum(dim=1).max())  # L is the longest row
    assert (ids[mask == 0] == tok.pad_token_id).all()
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    assert mask[0].tolist() == sorted(mask[0].tolist(), reverse=True)  # right padding
    assert _answer_text(tok, labels[0]) == " no" + EOS
    # the prompt's trailing space moves to the answer (lm-eval boundary)
    assert _answer_text(tok, labels[1]) == " surely not" + EOS
    for r, ex in enumerate(examples):
        n = int(mask[r].sum())
        assert tok.decode(ids[r, :n].tolist()) == ex.prompt + ex.choices[ex.answer] + EOS
        answer_pos = (labels[r] != IGNORE_INDEX).nonzero().flatten()
        assert answer_pos.tolist() == list(range(n - len(answer_pos), n))  # prompt positions are masked
        assert (labels[r, answer_pos] == ids[r, answer_pos]).all()


def test_encode_without_eos():
    tok = byte_tokenizer()
    _, _, labels = encode_for_training(tok, [MCExample("Q:", (" a", " bc"), 1)], 32, add_eos=False)
    assert _answer_text(tok, labels[0]) == " bc"


def test_encode_matches_the_evaluator_boundary():
    tok = byte_tokenizer()
    ex = MCExample("Which one?\nAnswer: ", ("x", "yz"), 1)
    ids, _, labels = encode_for_training(tok, [ex], 64, add_eos=False)
    context, continuation = encode_pair(tok, ex.prompt, ex.choices[1])
    assert ids[0].tolist() == context + continuation
    assert labels[0, len(context) :].tolist() == continuation


def test_encode_truncates_the_prompt_from_the_left():
    tok = byte_tokenizer()
    prompt = "0123456789" * 5 + "\nAnswer:"
    ex = MCExample(prompt, (" short", " a long answer"), 1)
    ids, mask, labels = encode_for_training(tok, [ex], max_length=24)
    assert ids.shape == (1, 24) and mask.all()
    assert _answer_text(tok, labels[0]) == " a long answer" + EOS
    kept = tok.decode(ids[0].tolist())
    assert kept.endswith("\nAnswer: a long answer" + EOS)
    assert prompt.endswith(kept.removesuffix(" a long answer" + EOS))  # the prompt's tail survives
    with pytest.raises(ValueError, match="no room"):
        encode_for_training(tok, [ex], max_length=15)


def test_build_task_from_a_files_source(corpus_dir):
    task = build_task(SourceConfig(corpus="files", path=corpus_dir), max_chars=40)
    assert len(task) == 48
    assert task[0].choices == (" alpha", " beta", " delta", " gamma")
    assert all(ex.choices[ex.answer] == f" {ex.label}" for ex in task)
    assert all(len(ex.prompt.split("\n")[0]) <= len("Article: ") + 40 for ex in task)
