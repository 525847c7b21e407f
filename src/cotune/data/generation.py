"""Generation tasks: (prompt, response) examples read from the user's files or built from the corpora,
and their encoding for training (loss on the response only) and for generation (`GenRequest`).

Layouts of a generation file (JSONL lines, or rows of any table `data/tables.py` reads; `task.columns`
renames every field):

- prompt: `{"prompt": ..., "response": ...}`;
- alpaca: `{"instruction": ..., "input": ..., "output": ...}`: the prompt is the instruction, or, when
  the input is a non-blank string, the instruction, a blank line and the input
  (`instruction + "\\n\\n" + input`); the output is the response;
- chat: `{"messages": [{"role": ..., "content": ...}, ...]}`: the LAST assistant turn is the response,
  the user turn right before it the prompt, the turns before that the example's history (turns after
  the response are dropped). Roles are system, user and assistant.

Every layout may carry a `label` (task.partition deals by it; default `NO_LABEL`). A bad row is refused
with file:line (JSONL) or file row N (tables), every bad row of a file at once (the first `PER_FILE`
listed, the rest counted) and never its text: the data may be private.
"""

from __future__ import annotations

import ast
import contextlib
import json
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from cotune.config.schema import GenLayout, SourceConfig, TaskColumns
from cotune.data.corpora import Document, read_documents, read_user_text
from cotune.data.duplicates import dedupe
from cotune.data.errors import DataError
from cotune.data.files import path_problem
from cotune.data.tables import is_table, load_table, require_columns
from cotune.data.tasks import pad_rows, truncate_words
from cotune.evaluation.generation import GenRequest

NO_LABEL = "all"  # the label of a row without one: every such example is one group (IID splits)
ROLES = ("system", "user", "assistant")
PER_FILE = 5  # bad rows listed per file; the rest are counted
RESPONSE_SHARE = 0.5  # a response cut by max_length keeps at least this share of it (see `fit_lengths`)

Turn = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class GenExample:
    """One generation example: the prompt the model answers, the reference response, a label.

    `history`: the chat layout's turns before the prompt's user turn (a system turn, earlier exchanges);
    empty for the prompt and Alpaca layouts. The conversation the model is given is `history` and then
    the user turn `prompt` (`conversation()`).
    """

    prompt: str
    response: str
    label: str = NO_LABEL
    history: tuple[Turn, ...] = ()

    def conversation(self) -> list[dict[str, str]]:
        """The turns before the response, as a chat template takes them."""
        turns = [*self.history, ("user", self.prompt)]
        return [{"role": role, "content": content} for role, content in turns]


# --- rows -----------------------------------------------------------------------------------------


def row_layout(keys: Iterable[str], columns: TaskColumns) -> Literal["prompt", "alpaca", "chat"]:
    """The layout `task.layout: auto` finds in a row's keys (or a table's columns): messages, else
    instruction, else prompt."""
    present = set(keys)
    if columns.messages in present:
        return "chat"
    if columns.instruction in present:
        return "alpaca"
    return "prompt"


def layout_columns(layout: Literal["prompt", "alpaca", "chat"], columns: TaskColumns) -> list[str]:
    """The columns a table of this layout must have (Alpaca's input and every label are optional)."""
    if layout == "chat":
        return [columns.messages]
    if layout == "alpaca":
        return [columns.instruction, columns.output]
    return [columns.prompt, columns.response]


def text_field(row: dict[str, Any], key: str, where: str, what: str) -> str:
    """A required non-blank string field; the error names the field and the row, never the value."""
    value = row.get(key)
    if value is None:
        raise DataError(f"{where}: no {what} ({key!r} is missing or null)")
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: the {what} ({key!r}) is empty")
    return value


def row_label(row: dict[str, Any], key: str, where: str) -> str:
    label = row.get(key)
    if label is None:
        return NO_LABEL
    if isinstance(label, bool) or not isinstance(label, str | int) or not str(label).strip():
        raise DataError(f"{where}: {key!r} must be a non-empty string")
    return str(label)


def alpaca_prompt(instruction: str, extra: str | None) -> str:
    """The Alpaca join: the instruction, and a blank line and the input when the input is not blank."""
    return instruction if extra is None or not extra.strip() else f"{instruction}\n\n{extra}"


def chat_example(messages: Any, where: str, key: str) -> tuple[str, str, tuple[Turn, ...]]:
    """(prompt, response, history) of a chat row: the last assistant turn is the response."""
    if isinstance(messages, str):
        with contextlib.suppress(json.JSONDecodeError):  # a CSV cell holds the list as JSON text
            messages = json.loads(messages)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{role, content}} turns")
    turns: list[Turn] = []
    for i, turn in enumerate(messages, 1):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {i} of {key!r} must be an object with 'role' and 'content'")
        role, content = turn.get("role"), turn.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(f"{where}: turn {i} of {key!r}: 'role' must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {i} of {key!r}: 'content' must be a string")
        turns.append((role, content))
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: {key!r} has no assistant turn (the last one is the response)")
    if not turns[last][1].strip():
        raise DataError(f"{where}: the response (the last assistant turn of {key!r}) is empty")
    if last == 0 or turns[last - 1][0] != "user":
        raise DataError(f"{where}: the last assistant turn of {key!r} must follow a user turn (the prompt)")
    if not turns[last - 1][1].strip():
        raise DataError(f"{where}: the prompt (the user turn before the last assistant turn) is empty")
    return turns[last - 1][1], turns[last][1], tuple(turns[: last - 1])


def parse_gen_row(row: Any, where: str, columns: TaskColumns, layout: GenLayout = "auto") -> GenExample:
    """One row of a generation file as a GenExample; errors name `where` and the field, never the text."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    kind = row_layout(row, columns) if layout == "auto" else layout
    label = row_label(row, columns.label, where)
    if kind == "chat":
        prompt, response, history = chat_example(row.get(columns.messages), where, columns.messages)
        return GenExample(prompt, response, label, history)
    if kind == "alpaca":
        instruction = text_field(row, columns.instruction, where, "instruction")
        extra = row.get(columns.input)
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: {columns.input!r} must be a string, not {type(extra).__name__}")
        response = text_field(row, columns.output, where, "response")
        return GenExample(alpaca_prompt(instruction, extra), response, label)
    prompt = text_field(row, columns.prompt, where, "prompt")
    return GenExample(prompt, text_field(row, columns.response, where, "response"), label)


def gen_line(line: str, where: str, columns: TaskColumns, layout: GenLayout = "auto") -> GenExample:
    """One JSONL line of a generation file; errors name `where`, not what."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg})") from None
    return parse_gen_row(row, where, columns, layout)


# --- files ----------------------------------------------------------------------------------------


def gen_rows(path: Path, columns: TaskColumns, layout: GenLayout) -> Iterator[tuple[str, Any]]:
    """(where, item) of every row: a JSONL line's text (where: file:line), or a table row with the layout
    found from the table's columns (where: file row N)."""
    if is_table(path):
        text = [columns.prompt, columns.response, columns.instruction, columns.input, columns.output]
        table = load_table(path, text=[*text, columns.label])  # a CSV's "42" is a response, not a number
        kind = row_layout(table.column_names, columns) if layout == "auto" else layout
        require_columns(table, layout_columns(kind, columns), path, f"{kind} layout (task.columns)")
        for n, row in enumerate(table, 1):
            yield f"{path} row {n}", (row, kind)
        return
    for n, line in enumerate(read_user_text(path).splitlines(), 1):
        if line.strip():
            yield f"{path}:{n}", line


def load_gen_file(
    path: Path, columns: TaskColumns | None = None, layout: GenLayout = "auto"
) -> list[GenExample]:
    """A generation task from a JSONL file or a table; every bad row refused at once (one DataError)."""
    columns = columns or TaskColumns()
    path = Path(path).expanduser()
    problem = path_problem(path)
    if problem is not None:
        raise DataError(f"generation file {problem}")
    if path.is_dir() and not is_table(path):
        raise DataError(f"{path}: a folder, not a generation file (.jsonl, a table or a save_to_disk folder)")
    examples: list[GenExample] = []
    problems: list[str] = []
    for where, item in gen_rows(path, columns, layout):
        try:
            if isinstance(item, str):
                examples.append(gen_line(item, where, columns, layout))
            else:
                examples.append(parse_gen_row(item[0], where, columns, item[1]))
        except DataError as exc:
            problems.append(str(exc))
    if problems:
        shown = problems[:PER_FILE] + (
            [f"... and {len(problems) - PER_FILE} more"] if len(problems) > PER_FILE else []
        )
        raise DataError(
            f"{len(problems)} bad row(s) in generation file {path}:\n" + "\n".join(f"  - {p}" for p in shown)
        )
    if not examples:
        raise DataError(f"generation file {str(path)!r} has no examples")
    return examples


# --- shipped tasks --------------------------------------------------------------------------------

HEADLINE_INSTRUCTION = "Write the headline of this news article.\n\n"
DOCSTRING_INSTRUCTION = "Write the first line of the docstring of this Python function.\n\n"


@dataclass(frozen=True)
class GenTask:
    """A built generation task: its examples, how many duplicated examples (same prompt) and duplicated
    documents (`corpora.read_documents`) were dropped before any split."""

    examples: list[GenExample]
    duplicates: int
    duplicate_documents: int = 0


def dedupe_prompts(examples: Iterable[GenExample], duplicate_documents: int = 0) -> GenTask:
    """Keep the first example of each prompt: two documents that differ only past the prompt's cut, or
    a copied function, would otherwise land in both a training and the test split."""
    built = dedupe(examples, lambda ex: ex.prompt)
    return GenTask(built.items, built.duplicates, duplicate_documents)


def headline_examples(docs: Sequence[Document], max_chars: int | None = 600) -> Iterator[GenExample]:
    """BBC article -> its title. A BBC file's first line is the title, the rest the body; the prompt is
    `HEADLINE_INSTRUCTION` + the body (whitespace collapsed, cut to max_chars on a word boundary), the
    label the document's (topic). A document with no body or no title is skipped."""
    for doc in docs:
        title, _, body = doc.text.strip().partition("\n")
        body = truncate_words(body, max_chars)
        if title.strip() and body:
            yield GenExample(HEADLINE_INSTRUCTION + body, " ".join(title.split()), doc.label)


def cut_lines(code: str, max_chars: int | None) -> str:
    """Whole lines of `code` while they fit in max_chars (the first line always, hard-cut if needed):
    the signature is kept, the end of a long body goes (a prompt cut from the left would lose it)."""
    if max_chars is None or len(code) <= max_chars:
        return code
    lines = code.splitlines()
    kept = [lines[0][:max_chars]]
    size = len(kept[0])
    for line in lines[1:]:
        if size + 1 + len(line) > max_chars:
            break
        kept.append(line)
        size += 1 + len(line)
    return "\n".join(kept)


def function_examples(source: str, label: str, max_chars: int | None = 600) -> Iterator[GenExample]:
    """A module's functions (methods and nested ones too, in `ast.walk` order) -> their docstring's
    first line. The prompt is `DOCSTRING_INSTRUCTION` + the function's source from its `def` line
    (decorators left out) to its last line, dedented, with the docstring's lines removed, cut by whole
    lines to max_chars; the response is the docstring's first non-blank line (`ast.get_docstring`
    cleaned). Skipped: a module that does not parse, a function without a docstring, one whose
    docstring shares a line with other code (the def line or the next statement), one whose body is
    nothing but the docstring."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        first = next((ln.strip() for ln in (doc or "").splitlines() if ln.strip()), "")
        if not first or len(node.body) < 2:
            continue
        doc_node, after = node.body[0], node.body[1]
        assert doc_node.end_lineno is not None and node.end_lineno is not None
        if doc_node.lineno == node.lineno or after.lineno <= doc_node.end_lineno:
            continue
        kept = lines[node.lineno - 1 : doc_node.lineno - 1] + lines[doc_node.end_lineno : node.end_lineno]
        code = textwrap.dedent("\n".join(kept)).strip("\n")
        yield GenExample(DOCSTRING_INSTRUCTION + cut_lines(code, max_chars), first, label)


def docstring_examples(docs: Sequence[Document], max_chars: int | None = 600) -> Iterator[GenExample]:
    """`function_examples` of every python document, labelled by the document's label (its top-level
    module or package; label_by source: 'python')."""
    for doc in docs:
        yield from function_examples(doc.text, doc.label, max_chars)


def shipped_task(source: SourceConfig, max_chars: int | None = 600) -> GenTask:
    """The generation task of a corpus (bbc: headlines, python: docstrings), duplicated documents and
    prompts dropped; the
    same examples in the same order on every call (the corpora are read in sorted order)."""
    docs = read_documents([source])
    if source.corpus == "bbc":
        built = dedupe_prompts(headline_examples(docs.items, max_chars), docs.duplicates)
    elif source.corpus == "python":
        built = dedupe_prompts(docstring_examples(docs.items, max_chars), docs.duplicates)
    else:
        raise DataError(f"corpus '{source.corpus}' has no generation task (shipped: bbc, python)")
    if not built.examples:
        raise DataError(f"corpus '{source.corpus}' gave no generation examples")
    return built


# --- encoding -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenFormat:
    """How examples become tokens for one tokenizer: through its chat template or the plain format,
    and the token that closes a response (EOS, or the template's end-of-turn, e.g. ChatML's <|im_end|>)."""

    template: bool
    stop_id: int


def plain_prompt(example: GenExample) -> str:
    """The plain format (`task.chat_template: none`, or a tokenizer without a template): each turn as
    'Role:' on its own line, its content, a blank line; then 'Assistant:' and a newline."""
    turns = [*example.history, ("user", example.prompt)]
    return "".join(f"{role.capitalize()}:\n{content}\n\n" for role, content in turns) + "Assistant:\n"


def template_prompt(tokenizer: PreTrainedTokenizerBase, example: GenExample) -> str:
    """The conversation through the tokenizer's chat template, ending with its generation prompt."""
    try:
        text = tokenizer.apply_chat_template(
            example.conversation(), tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # jinja2's TemplateError and what a template raises: its message may quote data
        raise DataError(
            f"the tokenizer's chat template refused a conversation ({type(exc).__name__}; e.g. roles it does "
            "not take, such as a system turn); set task.chat_template: none for the plain format"
        ) from None
    assert isinstance(text, str)
    return text


def gen_format(
    tokenizer: PreTrainedTokenizerBase, chat_template: Literal["auto", "none"] = "auto"
) -> GenFormat:
    """The format `task.chat_template` asks for. With a template, the stop token is the first token the
    template writes after an assistant message when that is a special token (ChatML: <|im_end|>), else
    EOS; the plain format stops at EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to close a response with")
    if chat_template == "none" or not getattr(tokenizer, "chat_template", None):
        return GenFormat(False, int(eos))
    probe = GenExample("?", "!")
    prompt = template_prompt(tokenizer, probe)
    full = tokenizer.apply_chat_template(
        [*probe.conversation(), {"role": "assistant", "content": probe.response}], tokenize=False
    )
    assert isinstance(full, str)
    if not full.startswith(prompt + probe.response):
        raise DataError(
            "the tokenizer's chat template does not write an assistant message after its generation "
            "prompt; set task.chat_template: none"
        )
    suffix = tokenizer.encode(full[len(prompt) + len(probe.response) :], add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    stop = suffix[0] if suffix and suffix[0] in special else eos
    return GenFormat(True, int(stop))


def fit_lengths(n_prompt: int, n_response: int, max_length: int) -> tuple[int, int]:
    """(prompt tokens kept, response tokens kept) within max_length. The rule: nothing is cut when both
    fit; else the response keeps what the whole prompt leaves, but at least RESPONSE_SHARE of max_length
    (rounded down) when it is that long, and the prompt keeps the rest; the prompt is then cut from the
    left (its start goes), the response from the right (its end and stop token go)."""
    if n_prompt + n_response <= max_length:
        return n_prompt, n_response
    keep_response = min(n_response, max(max_length - n_prompt, int(max_length * RESPONSE_SHARE)))
    return min(n_prompt, max_length - keep_response), keep_response


def encode_request(
    tokenizer: PreTrainedTokenizerBase, example: GenExample, max_length: int, fmt: GenFormat
) -> GenRequest:
    """The example as token ids: the prompt (template or plain format, ending with the generation
    prompt), the response closed by `fmt.stop_id`, both cut by `fit_lengths`. Prompt and response are
    tokenized apart, so the boundary is where the generation prompt ends."""
    if max_length < 2:
        raise ValueError(f"max_length {max_length} leaves no room for a prompt and a response token")
    text = template_prompt(tokenizer, example) if fmt.template else plain_prompt(example)
    prompt_ids = list(tokenizer.encode(text, add_special_tokens=False))
    response_ids = [*tokenizer.encode(example.response, add_special_tokens=False), fmt.stop_id]
    n_prompt, n_response = fit_lengths(len(prompt_ids), len(response_ids), max_length)
    prompt_ids = prompt_ids[len(prompt_ids) - n_prompt :]
    return GenRequest(tuple(prompt_ids), tuple(response_ids[:n_response]), example.response, example.prompt)


def gen_requests(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[GenExample],
    max_length: int,
    chat_template: Literal["auto", "none"] = "auto",
) -> list[GenRequest]:
    """`encode_request` of every example, in one format (what evaluation and training both read)."""
    fmt = gen_format(tokenizer, chat_template)
    return [encode_request(tokenizer, ex, max_length, fmt) for ex in examples]


def training_tensors(
    requests: Sequence[GenRequest], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (N, L): input = prompt + response, right-padded with
    `pad_id` to the longest row; labels are IGNORE_INDEX on every prompt position and on padding, so
    the loss covers response tokens only. One example per row: attention never crosses examples."""
    return pad_rows([(list(r.prompt_ids), list(r.response_ids)) for r in requests], pad_id)
