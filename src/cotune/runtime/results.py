"""Using what a run produced: generate with an adapter, score it on a task file, export it.

An adapter is named as in the run's checkpoints: a client's (`client-KK`, both families),
FedCoLLM's server SLM adapter theta (`server`) or the server LLM's omega (`server-llm`). It is
loaded from the newest intact checkpoint onto the base model its config names, so a run directory
is all a user needs (plus the offline model assets).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from cotune.algorithms.ranks import rank_of
from cotune.assets import ASSETS
from cotune.config.loader import ConfigError, load_config
from cotune.config.schema import (
    DEFAULT_MAX_NEW_TOKENS,
    ExperimentConfig,
    LoraSettings,
    ModelConfig,
    TaskColumns,
    TaskKind,
)
from cotune.data.corpora import read_user_text
from cotune.data.generation import GenExample, gen_requests, load_gen_file
from cotune.data.tables import is_table, load_table
from cotune.data.tasks import load_task_file
from cotune.errors import OrdinaryError
from cotune.evaluation.generation import (
    GenEval,
    context_length,
    evaluate_generation,
    fit_context,
    greedy_decode,
    pad_token_id,
    stop_token_ids,
)
from cotune.evaluation.multiple_choice import MCExample, MCResult, evaluate_multiple_choice
from cotune.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG_FILE
from cotune.models.adapter_check import AdapterSpec, check_adapter
from cotune.models.loader import no_loading_bars
from cotune.models.lora import AdapterPool, lora_config
from cotune.reporting.files import DIR_MODE, FILE_MODE, normal_modes
from cotune.runtime.fedcollm import LLM_ADAPTER, SERVER
from cotune.runtime.rundir import client_name, load_adapter, newest_intact
from cotune.runtime.setup import load_model


@dataclass
class TunedModel:
    """A base model with one of the run's adapters active."""

    pool: AdapterPool
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    cfg: ExperimentConfig
    adapter_dir: Path  # the adapter in PEFT format, in the checkpoint it was read from


class RunDirError(ValueError, OrdinaryError):
    """A path given as a run directory that a command cannot use; the message says what to give instead."""


@dataclass(frozen=True)
class Adapter:
    """One adapter of a run, found in its newest intact checkpoint."""

    cfg: ExperimentConfig
    name: str
    adapter_dir: Path


def adapter_spec(cfg: ExperimentConfig, name: str) -> tuple[ModelConfig, LoraSettings]:
    """The base model and LoRA settings adapter `name` was trained with (the server LLM's are its own)."""
    if name == LLM_ADAPTER and cfg.llm is not None:
        return cfg.llm.model, cfg.llm.lora
    return cfg.model, cfg.lora


def adapter_name(cfg: ExperimentConfig, client: int | None, server: bool, llm: bool) -> str:
    """Which adapter `--client K` / `--server` / `--llm` names in this run (refused when it has none)."""
    if sum([client is not None, server, llm]) > 1:
        raise ValueError("name one adapter: --client K, --server or --llm")
    if client is not None:
        if not 0 <= client < cfg.federation.clients:
            raise ValueError(f"--client {client}: this run has clients 0..{cfg.federation.clients - 1}")
        return client_name(client)
    if not cfg.is_cotuning:
        raise ValueError("a personalized run has one adapter per client: choose it with --client K")
    if llm:
        if cfg.llm is None:
            raise ValueError("this run has no server LLM (no llm section)")
        return LLM_ADAPTER
    return SERVER


def run_config(run_dir: Path) -> ExperimentConfig:
    """The config of a run directory, or a RunDirError saying why `run_dir` is not one (before any model
    loads: a wrong path is the commonest mistake)."""
    give = "give the folder `cotune run` wrote (it holds config.yaml and checkpoints/)"
    if not run_dir.exists():
        raise RunDirError(f"{run_dir} does not exist: {give}")
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a run directory: {give}")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory (no config.yaml): {give}")
    try:
        yaml.safe_load(path.read_bytes())  # its parser's message would quote the file: say only where
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise RunDirError(
            f"{path}{where} is not valid YAML, so {run_dir} is not a cotune run directory"
        ) from None
    try:
        return load_config(path)
    except ConfigError as e:
        raise RunDirError(f"{run_dir} is not a cotune run directory: {e}") from None
    except UnicodeDecodeError:
        raise RunDirError(f"{path} is not UTF-8 text, so {run_dir} is not a cotune run directory") from None


def find_adapter(
    run_dir: Path, client: int | None = None, server: bool = False, llm: bool = False
) -> Adapter:
    """Where the named adapter lies in the run's newest intact checkpoint (no model is loaded)."""
    cfg = run_config(run_dir)
    name = adapter_name(cfg, client, server, llm)
    return checkpoint_adapters(run_dir, cfg, [name])[0]


def checkpoint_adapters(run_dir: Path, cfg: ExperimentConfig, names: Sequence[str]) -> list[Adapter]:
    """Where adapters `names` lie in the run's newest intact checkpoint, found once for all of them (a
    checkpoint's state is read whole to check it)."""
    found = newest_intact(run_dir)
    if found is None or found[0] < 0:
        raise RunDirError(
            f"{run_dir} has no intact checkpoint to take the adapter from (the run stopped before its "
            "first round was saved, or its checkpoints are damaged): run it again, or `cotune run --resume`"
        )
    adapters = []
    for name in names:
        adapter_dir = found[1] / name
        if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
            raise RunDirError(f"{run_dir}: its checkpoint round {found[0]} holds no adapter {name!r}")
        adapters.append(Adapter(cfg, name, adapter_dir))
    return adapters


def open_tuned(
    run_dir: Path,
    client: int | None = None,
    server: bool = False,
    llm: bool = False,
    console: Console | None = None,
) -> TunedModel:
    """The base model with the named adapter of the run's newest intact checkpoint."""
    return load_tuned(find_adapter(run_dir, client, server, llm), console)


def load_tuned(adapter: Adapter, console: Console | None = None) -> TunedModel:
    """The base model with `adapter` active (what `find_adapter` found), once the adapter is checked to
    be this run's: what needs no model before it loads, its shapes against the run's pool after."""
    cfg, name, adapter_dir = adapter.cfg, adapter.name, adapter.adapter_dir
    model_cfg, lora = adapter_spec(cfg, name)
    state, file = load_adapter(adapter_dir), adapter_dir / ADAPTER_WEIGHTS
    check_adapter(file, state)
    base, tokenizer, device = load_model(cfg, model_cfg, console)
    pool = AdapterPool(base, lora, [name], [rank_of(state)])  # clients may differ in rank (lora.ranks)
    activate_checked(pool, name, file, state, device)
    return TunedModel(pool, tokenizer, device, cfg, adapter_dir)


def activate_checked(
    pool: AdapterPool, slot: str, file: Path, state: Mapping[str, torch.Tensor], device: torch.device
) -> None:
    """`state` (read from `file`) into `slot`, once its shapes are checked against the slot, made the
    adapter the model runs, in evaluation mode."""
    check_adapter(file, state, AdapterSpec.of(pool.view(slot)))
    pool.load_state(slot, {k: v.to(device) for k, v in state.items()})
    pool.activate(slot)
    pool.model.eval()


def switch_adapter(tuned: TunedModel, adapter: Adapter) -> TunedModel:
    """`tuned` running another adapter of the same base (e.g. the next client's), in a spare slot of its
    rank: the base model is loaded once for a command that reads several adapters (`cotune audit`)."""
    if adapter_spec(adapter.cfg, adapter.name) != adapter_spec(tuned.cfg, tuned.adapter_dir.name):
        raise ValueError(f"adapter {adapter.name!r} is not on the base model that is loaded")
    state, file = load_adapter(adapter.adapter_dir), adapter.adapter_dir / ADAPTER_WEIGHTS
    check_adapter(file, state)
    activate_checked(tuned.pool, tuned.pool.scratch(rank_of(state)), file, state, tuned.device)
    return TunedModel(tuned.pool, tuned.tokenizer, tuned.device, tuned.cfg, adapter.adapter_dir)


def check_prompt(prompt: str) -> None:
    """Refuse a prompt with nothing to continue before the model loads (an empty one crashes generate)."""
    if not prompt.strip():
        raise ValueError(
            'the prompt is empty: give the text to continue, e.g. cotune generate RUN_DIR "Write a headline '
            'about ..." --client 0'
        )


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt as the model expects it: through its chat template when it has one.

    `return_dict=False` asks for the token ids themselves; transformers 5 otherwise answers with a
    BatchEncoding, which is also accepted in case a tokenizer ignores the flag.
    """
    if getattr(tokenizer, "chat_template", None):
        ids: Any = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    else:
        ids = tokenizer.encode(prompt)
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # one conversation, batched
        ids = ids[0]
    return [int(i) for i in ids]


def check_context(tuned: TunedModel, n_prompt: int, max_new_tokens: int) -> None:
    """Refuse a prompt plus continuation longer than the positions the model has."""
    limit = context_length(tuned.pool.model)
    if limit is not None and n_prompt + max_new_tokens > limit:
        raise ValueError(
            f"the prompt is {n_prompt} tokens and --max-new-tokens {max_new_tokens}: the model reads at most "
            f"{limit} tokens; shorten the prompt or lower --max-new-tokens"
        )


def generate(tuned: TunedModel, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy continuation of `prompt` (reproducible: no sampling), by the decoding that scores
    generation tasks (`greedy_decode`), stopping at the model's and the tokenizer's end tokens."""
    check_prompt(prompt)
    token_ids = prompt_ids(tuned.tokenizer, prompt)
    if not token_ids:
        raise ValueError("the prompt encodes to no tokens: give some text to continue")
    check_context(tuned, len(token_ids), max_new_tokens)
    model, tok = tuned.pool.model, tuned.tokenizer
    [new] = greedy_decode(
        model,
        [token_ids],
        batch_size=1,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_token_ids(model, tok),
        pad_id=pad_token_id(tok),
    )
    return str(tok.decode(new, skip_special_tokens=True))


COLUMN_FIELDS = tuple(TaskColumns.model_fields)


def task_columns(specs: list[str] | None) -> TaskColumns:
    """`--columns prompt=question,choices=options` (repeatable) as the TaskColumns `load_task_file` reads."""
    given: dict[str, str] = {}
    for spec in specs or []:
        for pair in spec.split(","):
            field, sep, column = (part.strip() for part in pair.partition("="))
            if not sep or not field or not column:
                raise ValueError(
                    "--columns takes FIELD=COLUMN pairs separated by commas, e.g. "
                    "--columns prompt=question,choices=options,answer=gold"
                )
            if field not in COLUMN_FIELDS:
                raise ValueError(
                    f"--columns: unknown field {field[:40]!r}; the fields are {', '.join(COLUMN_FIELDS)}"
                )
            if field in given:
                raise ValueError(f"--columns names the column of {field!r} twice")
            given[field] = column
    return TaskColumns(**given)


def evaluate_task(
    tuned: TunedModel, examples: Sequence[MCExample], batch_size: int = 8, max_length: int = 512
) -> MCResult:
    """Multiple-choice accuracy of the adapter on the user's task (read with `load_task_file`)."""
    return evaluate_multiple_choice(
        tuned.pool.model, tuned.tokenizer, list(examples), batch_size=batch_size, max_length=max_length
    )


def task_file_kind(cfg: ExperimentConfig, path: Path, columns: TaskColumns) -> TaskKind:
    """The kind of task `cotune eval --task` scores: the run's task.kind, or (a run without a task: the
    personalized family) the kind the file's first row has: multiple choice when it has the choices
    field, generation when it has a response field of a generation layout. Anything else is read as
    multiple choice, whose loader names what is missing."""
    if cfg.task is not None:
        return cfg.task.kind
    path = Path(path).expanduser()
    if is_table(path):
        keys = set(load_table(path).column_names)
    else:
        first = next((line for line in read_user_text(path).splitlines() if line.strip()), "{}")
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            return "multiple_choice"
        keys = set(row) if isinstance(row, dict) else set()
    if columns.choices in keys:
        return "multiple_choice"
    generation = {columns.response, columns.output, columns.messages}
    return "generation" if keys & generation else "multiple_choice"


def read_eval_task(cfg: ExperimentConfig, path: Path, columns: TaskColumns) -> tuple[TaskKind, list[Any]]:
    """The user's task file for `cotune eval`, of the kind `task_file_kind` finds (generation rows in the
    run's task.layout), every bad row refused at once by its loader, before any model loads."""
    kind = task_file_kind(cfg, path, columns)
    if kind == "generation":
        layout = cfg.task.layout if cfg.task is not None else "auto"
        return kind, list(load_gen_file(path, columns, layout))
    return kind, list(load_task_file(path, columns))


DEFAULT_EVAL_LENGTH = 512  # tokens per example when the run's config names none


def generation_settings(cfg: ExperimentConfig) -> tuple[int, Literal["auto", "none"], int]:
    """(max_length, chat_template, max_new_tokens) the run encoded and decoded generation data with; the
    defaults for a run that had none."""
    task = cfg.task if cfg.task is not None and cfg.task.kind == "generation" else None
    if task is None:
        return DEFAULT_EVAL_LENGTH, "auto", DEFAULT_MAX_NEW_TOKENS
    return task.max_length, task.chat_template, task.max_new_tokens


def evaluate_generation_task(
    tuned: TunedModel,
    examples: Sequence[GenExample],
    batch_size: int = 8,
    max_new_tokens: int | None = None,
) -> GenEval:
    """Greedy generations of the adapter on the user's generation examples, judged against their
    responses (exact match, F1, ROUGE-L) with the responses' perplexity: the run's encoding (task
    max_length, chat template) and decoding budget (task.max_new_tokens unless given), the prompts cut
    to leave room for it in the model's context, as the run's own evaluation does."""
    max_length, template, budget = generation_settings(tuned.cfg)
    budget = max_new_tokens or budget
    model, tok = tuned.pool.model, tuned.tokenizer
    requests = fit_context(gen_requests(tok, examples, max_length, template), context_length(model), budget)
    return evaluate_generation(
        model,
        requests,
        batch_size=batch_size,
        max_new_tokens=budget,
        stop_ids=stop_token_ids(model, tok),
        pad_id=pad_token_id(tok),
        decode=lambda ids: str(tok.decode(ids, skip_special_tokens=True)),
    )


# ---- export ---------------------------------------------------------------------------------------------
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)  # what is taken from a checkpoint


def check_export_target(out: Path) -> None:
    """Refuse an output that exists with content, or a place that cannot be written (before any load)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: choose another output directory")
    parent = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write under {parent}: choose an output directory you can write")


def base_model_id(name: str) -> str:
    """What to name as the base model so others can load the adapter: the Hugging Face hub id of a
    built-in asset (it was trained on that model's GGUF, dequantized), else the run's model.name."""
    asset = ASSETS.get(name)
    return asset.hub_id if asset is not None and asset.hub_id else name


def exported_config(adapter: Adapter) -> dict[str, Any]:
    """The checkpoint's adapter_config.json, checked against the run's adapter spec and the weights' rank
    (cheap: called before the model loads too), naming the base model so that others can load it."""
    path = adapter.adapter_dir / ADAPTER_CONFIG
    damaged = "the checkpoint is damaged: export another round or rerun the run"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing: {damaged}") from None
    except OSError as e:
        raise RunDirError(f"{path} cannot be read ({e.strerror or type(e).__name__}): {damaged}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RunDirError(f"{path} is not valid JSON: {damaged}") from None
    model_cfg, lora = adapter_spec(adapter.cfg, adapter.name)
    rank = rank_of(load_adapter(adapter.adapter_dir))
    expected = lora_config(lora, rank)
    if (
        not isinstance(config, dict)
        or config.get("peft_type") != "LORA"
        or config.get("r") != rank
        or not isinstance(config.get("lora_alpha"), int | float)
        or not math.isclose(config["lora_alpha"], expected.lora_alpha)
        or not isinstance(config.get("target_modules"), list)
        or set(config["target_modules"]) != set(expected.target_modules or [])
    ):
        raise RunDirError(
            f"{path} does not describe this run's LoRA adapter (type, rank, alpha, targets): {damaged}"
        )
    config.update(base_model_name_or_path=base_model_id(model_cfg.name), inference_mode=True)
    return config


def model_card(tuned: TunedModel) -> str:
    """README.md of an exported adapter: which run adapter it is and what its base model is exactly."""
    model_cfg, _ = adapter_spec(tuned.cfg, tuned.adapter_dir.name)
    asset = ASSETS.get(model_cfg.name)
    base = f"`{base_model_id(model_cfg.name)}`"
    if asset is not None:
        base += (
            f": trained on cotune's asset `{asset.name}` ({asset.description}), dequantized, so the "
            "hub's full-precision weights give slightly different outputs"
        )
    return (
        f"# LoRA adapter `{tuned.adapter_dir.name}` exported by cotune\n\n"
        f"From checkpoint `{tuned.adapter_dir.parent.name}`. Base model {base}.\n\n"
        "Load it with `PeftModel.from_pretrained(base_model, this_folder)`.\n"
    )


def write_new(path: Path, data: bytes) -> None:
    """Create `path` with exported-file permissions (the umask still applies)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def export(tuned: TunedModel, out: Path, merge: bool = False) -> tuple[Path, list[str]]:
    """The adapter in PEFT format, or (`merge`) a standalone model directory with the adapter folded
    into the weights, which `AutoModelForCausalLM.from_pretrained(out)` loads offline. Never over an
    existing directory that has content. Returns the directory and the names of the checkpoint files
    left out: only the files above are exported, never one cotune does not write (e.g. a pickle)."""
    check_export_target(out)
    if merge:
        out.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        merged = tuned.pool.model.merge_and_unload()
        with no_loading_bars():  # its bar would land in piped logs
            merged.save_pretrained(out)
            tuned.tokenizer.save_pretrained(out)
        normal_modes(out)
        return out, []
    config = exported_config(Adapter(tuned.cfg, tuned.adapter_dir.name, tuned.adapter_dir))
    skipped = sorted(p.name for p in tuned.adapter_dir.iterdir() if p.name not in ADAPTER_FILES)
    out.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    write_new(out / ADAPTER_WEIGHTS, (tuned.adapter_dir / ADAPTER_WEIGHTS).read_bytes())
    write_new(out / ADAPTER_CONFIG, json.dumps(config, indent=2).encode())
    write_new(out / "README.md", model_card(tuned).encode())
    return out, skipped
