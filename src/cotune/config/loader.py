"""Load an experiment YAML, apply dotted overrides, validate, and explain every mistake.

All checks run here, before a model or dataset is touched, so a bad config never costs
a model load or a half-finished run.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from cotune.config.schema import ExperimentConfig


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what was expected."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (["train", "lr"], 0.001); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value (e.g. train.lr=1e-3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"override {text!r}: '{where}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def _section_of(field: FieldInfo) -> type[BaseModel] | None:
    """The config section a field holds (also through `X | None`), or None for a plain value."""
    annotation = field.annotation
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _field_at(model: type[BaseModel], loc: Sequence[str | int]) -> FieldInfo | None:
    """The field at a dotted location (a list of keys), or None where there is none."""
    current: type[BaseModel] | None = model
    field = None
    for part in loc:
        field = current.model_fields.get(part) if current is not None and isinstance(part, str) else None
        if field is None:
            return None
        current = _section_of(field)
    return field


def _known_keys(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """The keys allowed at `loc` (the parent of an unknown key), for a helpful message."""
    if not loc:
        return sorted(model.model_fields)
    field = _field_at(model, loc)
    section = None if field is None else _section_of(field)
    return [] if section is None else sorted(section.model_fields)


NO_DEFAULT = object()  # a dotted key that is not a setting, or one without a default


def setting_default(dotted: str) -> Any:
    """A setting's default as it appears in a dumped config (JSON form), or NO_DEFAULT."""
    field = _field_at(ExperimentConfig, dotted.split("."))
    if field is None or field.is_required():
        return NO_DEFAULT
    value = field.get_default(call_default_factory=True)
    annotation: Any = field.annotation
    return TypeAdapter(annotation).dump_python(value, mode="json")


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in err.errors():
        loc = [p for p in item["loc"]]
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            known = _known_keys(ExperimentConfig, [p for p in loc[:-1] if isinstance(p, str)])
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            msg = f"unknown key '{dotted}'"
            if hint:
                msg += f" (did you mean '{hint[0]}'?)"
            if known:
                msg += f"; expected one of: {', '.join(known)}"
        else:
            given = item.get("input")
            shown = "" if isinstance(given, Mapping) else f" (got {given!r})"
            msg = f"'{dotted}': {item['msg']}{shown}"
        lines.append(f"  - {msg}")
    return "\n".join(lines)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf")


def check_paths(cfg: ExperimentConfig) -> None:
    """Fail early on paths that do not exist (hub ids and asset names are checked at load time)."""
    problems = []
    if cfg.data.path is not None and not cfg.data.path.expanduser().exists():
        problems.append(f"'data.path': the path {str(cfg.data.path)!r} does not exist")
    for i, src in enumerate(cfg.data.sources if cfg.data.path is None else []):
        if src.path is not None and not src.path.expanduser().exists():
            problems.append(f"'data.sources.{i}.path': the path {str(src.path)!r} does not exist")
    models = [("model.name", cfg.model.name)]
    if cfg.llm is not None:
        models.append(("llm.model.name", cfg.llm.model.name))
    for key, name in models:
        if _looks_like_path(name) and not Path(name).expanduser().exists():
            problems.append(f"'{key}': the path {name!r} does not exist")
    if cfg.task is not None:
        task_paths = [("task.path", cfg.task.path)]
        if cfg.task.source is not None:
            task_paths.append(("task.source.path", cfg.task.source.path))
        for key, path in task_paths:
            if path is not None and not path.expanduser().exists():
                problems.append(f"'{key}': the path {str(path)!r} does not exist")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def config_from_dict(tree: Mapping[str, Any], source: str = "") -> ExperimentConfig:
    try:
        cfg = ExperimentConfig.model_validate(dict(tree))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    check_paths(cfg)
    return cfg


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    tree = apply_overrides(tree, overrides)
    cfg = config_from_dict(tree, source=str(path))
    if cfg.run.name is None:
        cfg.run.name = path.stem
    return cfg


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML: every setting the run's family reads, defaults included, and no other."""
    return yaml.safe_dump(cfg.family_dump(), sort_keys=False)
