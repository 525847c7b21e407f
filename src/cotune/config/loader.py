"""Load an experiment YAML, apply dotted overrides, validate, and explain every mistake.

All checks run here, before a model or dataset is touched, so a bad config never costs
a model load or a half-finished run.
"""

from __future__ import annotations

import difflib
import reprlib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from cotune.config.schema import ExperimentConfig
from cotune.errors import OrdinaryError


class ConfigError(ValueError, OrdinaryError):
    """A config that cannot run; the message names the key and what was expected."""


MAX_CONFIG_BYTES = 1 << 20  # an experiment config is a few kB; more is not a config
MAX_YAML_VALUES = 100_000  # values of the tree once aliases are expanded ("billion laughs" stops here)
EXAMPLES = "examples/tiny-personalized.yaml, examples/fedcollm-tiny.yaml"

_short_repr = reprlib.Repr()  # bounded in depth and width, so even a huge value costs little to show
_short_repr.maxlevel, _short_repr.maxstring, _short_repr.maxother = 2, 48, 48
_short_repr.maxtuple = _short_repr.maxlist = _short_repr.maxdict = _short_repr.maxset = 4


def shown(value: Any, limit: int = 60) -> str:
    """A value the user typed, for an error message: its repr, bounded in time and length."""
    text = _short_repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses duplicate keys (at any level) instead of keeping the last one."""

    source = "<config>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges are meant to be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error names it
                break
            if first is not None:
                raise ConfigError(
                    f"{self.source}:{line}: duplicate key {shown(key)} (already set on line {first}): "
                    "keep one of them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for once every alias in it is expanded (memoised: linear time)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = MAX_YAML_VALUES + 1  # a node that contains itself expands without end
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, sizes) for v in node.value)
    else:
        size = 1
    sizes[id(node)] = min(size, MAX_YAML_VALUES + 1)
    return sizes[id(node)]


def _yaml_error(err: yaml.YAMLError, source: str) -> ConfigError:
    """file:line: and PyYAML's problem, without its snippet of the file (which could be any text)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{source}:{mark.line + 1}" if mark is not None else source
    problem = getattr(err, "problem", None) or type(err).__name__
    return ConfigError(f"{where}: the file is not valid YAML: {str(problem)[:120]}")


Lines = dict[tuple[str | int, ...], int]  # the line of each setting in the file, by its location


def _key_lines(node: yaml.Node, at: tuple[str | int, ...], lines: Lines) -> None:
    """Record the line of every key and list item under `node`, so an error can point at it."""
    if len(lines) > MAX_YAML_VALUES:
        return
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                lines.setdefault((*at, key.value), key.start_mark.line + 1)
                _key_lines(value, (*at, key.value), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            lines.setdefault((*at, i), value.start_mark.line + 1)
            _key_lines(value, (*at, i), lines)


def parse_yaml(text: str, source: str, lines: Lines | None = None) -> Any:
    """The YAML document in `text`: duplicate keys refused, alias expansion bounded, errors at file:line.
    `lines`, when given, receives the line of each setting (see `format_validation_error`)."""
    loader = _StrictLoader(text)
    loader.source = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise ConfigError(
                f"{source}: its YAML anchors and aliases (&name / *name) expand to more than "
                f"{MAX_YAML_VALUES:,} values: write the settings out instead"
            )
        if lines is not None:
            _key_lines(node, (), lines)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise _yaml_error(err, source) from None
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (["train", "lr"], 0.001); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {shown(text)} is not of the form key.path=value (e.g. train.lr=1e-3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _accepts_none(path: Sequence[str]) -> bool:
    """Whether the setting at `path` can hold null (`task`, `lora.ranks`, `train.max_grad_norm`...)."""
    field = _field_at(ExperimentConfig, path)
    if field is None:
        return True  # not a setting: validation names the unknown key
    annotation = field.annotation
    return annotation is None or (
        typing.get_origin(annotation) in (typing.Union, types.UnionType)
        and type(None) in typing.get_args(annotation)
    )


def apply_overrides(tree: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Set each `key.path=value`; `key=null` on a setting that cannot be null removes it (its default)."""
    for text in overrides:
        path, value = parse_override(text)
        if value is None and not _accepts_none(path):
            _remove(tree, path)
            continue
        node = tree
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"override {shown(text)}: '{where}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def _remove(tree: dict[str, Any], path: Sequence[str]) -> None:
    """Delete the setting at `path` (and nothing when it is not there)."""
    node: Any = tree
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


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


def _line_of(loc: Sequence[str | int], lines: Lines) -> int | None:
    """The line of the innermost part of `loc` that the file spells out."""
    for end in range(len(loc), 0, -1):
        if tuple(loc[:end]) in lines:
            return lines[tuple(loc[:end])] or None  # 0: set on the command line
    return None


def _overridden(lines: Lines, overrides: Iterable[str]) -> None:
    """Settings the command line replaced are no longer where the file has them."""
    for text in overrides:
        path = tuple(parse_override(text)[0])
        for at in [at for at in lines if at[: len(path)] == path]:
            del lines[at]
        lines[path] = 0


def format_validation_error(err: ValidationError, source: str, key_lines: Lines | None = None) -> str:
    lines = [f"invalid config {source}:"]
    for item in err.errors():
        loc = [p for p in item["loc"]]
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_of(loc, key_lines or {})
        where = f"line {line}: " if line is not None else ""
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
            got = "" if isinstance(given, Mapping) else f" (got {shown(given)})"
            msg = f"'{dotted}': {item['msg']}{got}"
        lines.append(f"  - {where}{msg}")
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


def config_from_dict(
    tree: Mapping[str, Any], source: str = "", lines: Lines | None = None
) -> ExperimentConfig:
    """The validated config of `tree` (`lines`: where each setting is in `source`, for the errors)."""
    try:
        cfg = ExperimentConfig.model_validate(dict(tree))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, lines)) from None
    check_paths(cfg)
    return cfg


def read_config_text(path: Path) -> str:
    """The config file's text; a path that is no file, too large or not UTF-8 is refused by name."""
    if not path.exists():
        raise ConfigError(f"config file {shown(str(path), 200)} does not exist")
    if not path.is_file():
        raise ConfigError(f"config {shown(str(path), 200)} is not a file: give an experiment YAML file")
    with path.open("rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, which no experiment config is")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 text (byte {e.start}): save it as UTF-8") from None


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    path = Path(path)
    lines: Lines = {}
    tree = parse_yaml(read_config_text(path), str(path), lines)
    if tree is None or tree == {}:
        raise ConfigError(
            f"{path} holds no settings: a config must say at least what to run; start from an example "
            f"({EXAMPLES})"
        )
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    overrides = list(overrides)
    tree = apply_overrides(tree, overrides)
    _overridden(lines, overrides)
    cfg = config_from_dict(tree, str(path), lines)
    if cfg.run.name is None:
        cfg.run.name = path.stem
    return cfg


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML: every setting the run's family reads, defaults included, and no other."""
    return yaml.safe_dump(cfg.family_dump(), sort_keys=False)
