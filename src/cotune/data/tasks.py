"""Multiple-choice tasks for FedCoLLM: topic classification from labelled documents or the user's JSONL.

A task is a list of `TaskExample`s (the evaluator's `MCExample` plus a label). Training teaches the model
to continue the prompt with the correct choice (answer-only loss); evaluation scores every choice's
log-likelihood, so the prompt/answer token boundary is the evaluator's own (lm-eval-harness rule).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from cotune.config.schema import PartitionConfig, SourceConfig, TaskColumns
from cotune.data.corpora import DataError, Document, read_documents, read_user_text
from cotune.data.duplicates import Deduped
from cotune.data.files import path_problem
from cotune.data.partition import partition as label_partition
from cotune.data.tables import is_table, load_table, require_columns
from cotune.evaluation.lm import IGNORE_INDEX
from cotune.evaluation.multiple_choice import MCExample, encode_pair


@dataclass(frozen=True)
class TaskExample(MCExample):
    """The evaluator's MCExample plus the label that stratified splits and label partitions group by.

    A subclass, so task examples go straight to `evaluate_multiple_choice`. `label` defaults to the
    correct choice without surrounding whitespace, so a task without explicit labels splits by answer.
    """

    label: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.choices, tuple):
            object.__setattr__(self, "choices", tuple(self.choices))
        if len(self.choices) < 2:
            raise ValueError(f"a multiple-choice example needs at least 2 choices, got {len(self.choices)}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer index {self.answer} is out of range for {len(self.choices)} choices")
        if not self.label:
            object.__setattr__(self, "label", self.choices[self.answer].strip())


def example_label(example: object) -> str:
    """The example's label (a TaskExample's, a generation example's); a plain MCExample (no label) is
    labelled by its stripped answer choice."""
    label = getattr(example, "label", "")
    if isinstance(label, str) and label:
        return label
    if not isinstance(example, MCExample):
        raise TypeError(f"{type(example).__name__} has no label")
    return example.choices[example.answer].strip()


# --- topic classification -------------------------------------------------------------------------

# The one place the topic prompt is written. The instruction language is independent of the article's
# language: fr/es Wikipedia text with the English template is the default.
TOPIC_TEMPLATES: dict[str, str] = {
    "en": "Article: {text}\nQuestion: Which topic is this article about? Options: {options}.\nAnswer:",
    "fr": "Article : {text}\nQuestion : De quel sujet parle cet article ? Options : {options}.\nRéponse :",
    "es": "Artículo: {text}\nPregunta: ¿De qué tema trata este artículo? Opciones: {options}.\nRespuesta:",
}
TOPIC_TEMPLATE = TOPIC_TEMPLATES["en"]


def truncate_words(text: str, max_chars: int | None) -> str:
    """Whitespace-normalised text cut to at most max_chars on a word boundary (hard cut for one long word).

    Newlines are collapsed so the article stays on the template's "Article:" line.
    """
    text = " ".join(text.split())
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]  # one extra char tells whether the cut falls on a word boundary
    space = cut.rfind(" ")
    return (cut[:space] if space > 0 else text[:max_chars]).rstrip()


def topic_task(
    docs: Sequence[Document],
    labels: Sequence[str] | None = None,
    max_chars: int | None = 600,
    template: str = TOPIC_TEMPLATE,
) -> list[TaskExample]:
    """One example per document: "which topic?" with every label of the task as a choice.

    Choices are `labels` in the given order (default: the sorted label set of `docs`), each with a leading
    space so they continue the prompt's "Answer:" as words. Documents whose label is not among `labels`
    are left out (a way to restrict the task); the template needs `{text}` and `{options}`.
    """
    names = list(labels) if labels is not None else sorted({d.label for d in docs})
    if len(names) < 2:
        raise DataError(f"a topic task needs at least 2 labels, got {names}")
    if len(set(names)) != len(names):
        raise DataError(f"topic labels must be distinct, got {names}")
    index = {name: i for i, name in enumerate(names)}
    choices = tuple(f" {name}" for name in names)
    options = ", ".join(names)
    examples = [
        TaskExample(
            prompt=template.format(text=truncate_words(d.text, max_chars), options=options),
            choices=choices,
            answer=index[d.label],
            label=d.label,
        )
        for d in docs
        if d.label in index
    ]
    if not examples:
        raise DataError(f"no document has one of the labels {names}")
    return examples


# --- user JSONL -----------------------------------------------------------------------------------


def parse_task_row(row: Any, where: str) -> TaskExample:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt, choices, answer = row.get("prompt"), row.get("choices"), row.get("answer")
    if not isinstance(prompt, str):
        raise DataError(f"{where}: 'prompt' must be a string")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of strings")
    if len(choices) < 2:
        raise DataError(f"{where}: 'choices' needs at least 2 entries, got {len(choices)}")
    if len(set(choices)) != len(choices):
        raise DataError(f"{where}: 'choices' must be distinct")
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise DataError(f"{where}: 'answer' {answer} is out of range for {len(choices)} choices")
        index = answer
    elif isinstance(answer, str):
        # the exact choice string, or else the one choice equal to it up to surrounding whitespace
        matches = [i for i, c in enumerate(choices) if c == answer] or [
            i for i, c in enumerate(choices) if c.strip() == answer.strip()
        ]
        if len(matches) != 1:
            found = "is not one of" if not matches else "matches several of"
            raise DataError(f"{where}: 'answer' {found} the line's choices")  # no values: private data
        index = matches[0]
    else:
        raise DataError(f"{where}: 'answer' must be a choice index (int) or a choice string")
    label = row.get("label")
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise DataError(f"{where}: 'label' must be a non-empty string")
    return TaskExample(prompt=prompt, choices=tuple(choices), answer=index, label=label or "")


def load_task_file(path: Path, columns: TaskColumns | None = None) -> list[TaskExample]:
    """A task from a JSONL file, or from a parquet / CSV / JSON / arrow file or save_to_disk folder, its
    fields found under `columns` (a CSV keeps `choices` as JSON text, e.g. '[" yes", " no"]')."""
    columns = columns or TaskColumns()
    path = Path(path).expanduser()
    if not is_table(path):
        return load_jsonl_task(path, columns)
    table = load_table(path)
    require_columns(table, [columns.prompt, columns.choices, columns.answer], path, "task")
    examples = [parse_task_row(_renamed(row, columns), f"{path} row {n}") for n, row in enumerate(table, 1)]
    if not examples:
        raise DataError(f"task file {str(path)!r} has no examples")
    return examples


def _renamed(row: dict[str, Any], columns: TaskColumns) -> dict[str, Any]:
    """A row's fields under the names `parse_task_row` reads; JSON text in the choices column is decoded."""
    out = {
        "prompt": row.get(columns.prompt),
        "choices": row.get(columns.choices),
        "answer": row.get(columns.answer),
        "label": row.get(columns.label),
    }
    if isinstance(out["choices"], str) and out["choices"].lstrip().startswith("["):
        with contextlib.suppress(json.JSONDecodeError):  # else left as text: parse_task_row refuses it
            out["choices"] = json.loads(out["choices"])
    return out


def load_jsonl_task(path: Path, columns: TaskColumns | None = None) -> list[TaskExample]:
    """Read `{"prompt", "choices", "answer", "label"?}` lines; errors name file:line.

    Choices are used verbatim (write the leading space yourself, e.g. " Paris"); blank lines are skipped
    and other keys are ignored.
    """
    path = Path(path).expanduser()
    problem = path_problem(path)
    if problem is not None or path.is_dir():
        raise DataError(f"task file {problem or f'{path}: a folder, not a .jsonl file or table'}")
    examples = []
    for n, line in enumerate(read_user_text(path).splitlines(), 1):
        if not line.strip():
            continue
        examples.append(task_line(line, f"{path}:{n}", columns))
    if not examples:
        raise DataError(f"task file {str(path)!r} has no examples")
    return examples


def task_line(line: str, where: str, columns: TaskColumns | None = None) -> TaskExample:
    """One JSONL line of a task file (its keys renamed by `columns`); errors name `where`, not what."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg})") from None
    if columns is not None and isinstance(row, dict):
        row = _renamed(row, columns)
    return parse_task_row(row, where)


def build_task(
    source: SourceConfig | None = None,
    path: Path | None = None,
    *,
    labels: Sequence[str] | None = None,
    max_chars: int | None = 600,
    prompt_language: str = "en",
    columns: TaskColumns | None = None,
) -> list[TaskExample]:
    """A topic task from a corpus source, or a user task from a JSONL file (exactly one of the two)."""
    if (source is None) == (path is None):
        raise ValueError("build_task needs exactly one of 'source' (topic task) or 'path' (JSONL task)")
    if path is not None:
        return load_task_file(path, columns)
    assert source is not None
    return source_task(source, labels=labels, max_chars=max_chars, prompt_language=prompt_language).items


def source_task(
    source: SourceConfig,
    *,
    labels: Sequence[str] | None = None,
    max_chars: int | None = 600,
    prompt_language: str = "en",
) -> Deduped[TaskExample]:
    """A topic task from a corpus source, and how many duplicated documents were dropped before it
    (`corpora.read_documents`): one example per distinct document."""
    if prompt_language not in TOPIC_TEMPLATES:
        raise ValueError(f"no topic template for {prompt_language!r} (have {sorted(TOPIC_TEMPLATES)})")
    docs = read_documents([source])
    template = TOPIC_TEMPLATES[prompt_language]
    return Deduped(topic_task(docs.items, labels, max_chars, template), docs.duplicates)


# --- splits ---------------------------------------------------------------------------------------


Example = TypeVar("Example")  # a task's example: MCExample (multiple choice) or GenExample (generation)


@dataclass
class TaskSplits(Generic[Example]):
    public: list[Example]  # the server's labelled public set
    clients: list[list[Example]]  # each client's private training set
    test: list[Example]  # stratified held-out set, seen by nobody during training
    labels: list[str]  # sorted label set of the whole task

    @property
    def mixtures(self) -> np.ndarray:
        """clients x labels: each client's label proportions (for oracle trust and reports)."""
        col = {name: j for j, name in enumerate(self.labels)}
        m = np.zeros((len(self.clients), len(self.labels)))
        for c, examples in enumerate(self.clients):
            for ex in examples:
                m[c, col[example_label(ex)]] += 1
        totals = m.sum(axis=1, keepdims=True)
        return np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)


def _n_test(n: int, fraction: float) -> int:
    """Per-label test count: rounded, but at least one when possible and never the whole label."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, int(np.floor(fraction * n + 0.5))))


def split_task(
    examples: Sequence[Example],
    n_clients: int,
    test_fraction: float,
    partition: PartitionConfig | None,
    rng: np.random.Generator,
    public_share: float | None = None,
) -> TaskSplits[Example]:
    """Stratified test hold-out, then the FedCoLLM split of the rest into a public set and K clients.

    IID (partition None or kind "iid"): the shuffled training set is cut into K+1 equal parts, part 0 the
    server's public set. Non-IID: the public set is still an IID 1/(K+1) share (or `public_share`) and the
    rest is spread over the clients by label with `cotune.data.partition.partition`. Every example lands in
    at most one split; only a label that the label partition gives to no client (`partition.labels`, or
    fewer clients than labels with one_label/mixed) is left out of the training splits.
    """
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if public_share is not None and not 0 < public_share < 1:
        raise ValueError(f"public_share must be in (0, 1), got {public_share}")
    labels = [example_label(ex) for ex in examples]
    names = sorted(set(labels))

    test_idx: list[int] = []
    for name in names:
        idx = np.array([i for i, lab in enumerate(labels) if lab == name])
        test_idx.extend(int(i) for i in idx[rng.permutation(len(idx))[: _n_test(len(idx), test_fraction)]])
    held = set(test_idx)
    train = np.array([i for i in range(len(examples)) if i not in held], dtype=int)
    order = train[rng.permutation(len(train))]
    if len(order) < n_clients + 1:
        raise DataError(
            f"{len(order)} training examples cannot make a public set and {n_clients} clients"
            f" ({len(examples)} examples, test_fraction {test_fraction})"
        )

    iid = partition is None or partition.kind == "iid"
    client_idx: list[list[int]] | None
    if public_share is None:
        parts = np.array_split(order, n_clients + 1)
        public_idx, rest = parts[0], order[len(parts[0]) :]
        client_idx = [[int(i) for i in p] for p in parts[1:]] if iid else None
    else:
        n_public = min(len(order) - n_clients, max(1, int(np.floor(public_share * len(order) + 0.5))))
        public_idx, rest = order[:n_public], order[n_public:]
        client_idx = [[int(i) for i in p] for p in np.array_split(rest, n_clients)] if iid else None
    if client_idx is None:
        assert partition is not None
        split = label_partition([labels[i] for i in rest], n_clients=n_clients, cfg=partition, rng=rng)
        client_idx = [[int(rest[j]) for j in ix] for ix in split.indices]
    empty = [c for c, ix in enumerate(client_idx) if not ix]
    if empty:
        raise DataError(f"clients {empty} got no training examples; use more data or fewer clients")

    def pick(ix: Iterable[int]) -> list[Example]:
        return [examples[int(i)] for i in ix]

    return TaskSplits(
        public=pick(public_idx),
        clients=[pick(ix) for ix in client_idx],
        test=pick(sorted(test_idx)),
        labels=names,
    )


# --- tokenisation ---------------------------------------------------------------------------------


def encode_for_training(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MCExample],
    max_length: int,
    add_eos: bool = True,
    add_bos: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (N, L): the loss falls on the correct answer only.

    The prompt/answer split is the evaluator's own `encode_pair` (lm-eval-harness rule: the prompt's
    trailing whitespace moves to the answer; answer = tokens of prompt+answer after the prompt's), so
    training teaches exactly the tokens that evaluation scores; pass the evaluator's `add_bos` too. The
    prompt is cut from the left so the answer (+ EOS) always fits; rows are right-padded with the pad
    token (EOS if the tokenizer has none) and L is the longest row.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
    eos_id = tokenizer.eos_token_id
    if add_eos and eos_id is None:
        raise ValueError("add_eos=True but the tokenizer has no EOS token")

    rows: list[tuple[list[int], list[int]]] = []
    for n, ex in enumerate(examples):
        prompt_ids, answer_ids = encode_pair(tokenizer, ex.prompt, ex.choices[ex.answer], add_bos=add_bos)
        if add_eos and eos_id is not None:  # (checked above: add_eos implies an EOS token)
            answer_ids = [*answer_ids, eos_id]
        keep = max_length - len(answer_ids)
        if keep < 1:  # the first answer token must be predicted from at least one prompt token
            raise ValueError(
                f"example {n}: the answer needs {len(answer_ids)} tokens, max_length {max_length} leaves"
                " no room for the prompt"
            )
        rows.append((prompt_ids[-keep:], answer_ids))

    return pad_rows(rows, pad_id)


def pad_rows(
    rows: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (N, L) with L the longest row: each row is a prompt and
    its target (answer, response) back to back, right-padded with `pad_id`; labels are IGNORE_INDEX on
    the prompt and the padding, so the loss falls on the target only. One example per row (no packing),
    so attention never crosses examples."""
    width = max((len(p) + len(a) for p, a in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, (prompt_ids, answer_ids) in enumerate(rows):
        n_prompt, n_all = len(prompt_ids), len(prompt_ids) + len(answer_ids)
        input_ids[r, :n_all] = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)
        attention_mask[r, :n_all] = 1
        labels[r, n_prompt:n_all] = torch.tensor(answer_ids, dtype=torch.long)
    return input_ids, attention_mask, labels
