"""The config reference page, generated from the pydantic schema so it cannot drift from it.

Every section of `cotune.config.schema.ExperimentConfig` and every key in it, with its type, its default
and its description (the `Field(description=...)` text; a key that holds a whole section takes its
section's docstring). The docs build (`make docs`, through `docs/hooks.py`) renders it fresh each time;
`tests/test_docs.py` checks that every key has a description. Run it by hand to see the page:

    PYTHONPATH=src python scripts/config_reference.py [OUT.md]
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from cotune.config.schema import ExperimentConfig

HEADER = """# Config reference

Every key of the experiment config, generated from its schema (`src/cotune/config/schema.py`) when the
docs are built, so it is always the code's own. A key is written as its dotted path, the same path an
override on the command line takes (`cotune run CONFIG train.lr=1e-3`); `null` is YAML's None. What the
keys do together, with examples: [The config file](config.md) and [Data](data.md).
"""

# Bounds as pydantic keeps them in a field's metadata (Field(ge=...), PositiveInt, min_length=...).
BOUNDS = {
    annotated_types.Gt: ("gt", "> {}"),
    annotated_types.Ge: ("ge", "≥ {}"),
    annotated_types.Lt: ("lt", "< {}"),
    annotated_types.Le: ("le", "≤ {}"),
    annotated_types.MinLen: ("min_length", "at least {} item(s)"),
}


def sections_of(annotation: Any) -> list[type[BaseModel]]:
    """The config sections a key's type holds (`ModelConfig`, `list[SourceConfig]`, `X | None`...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(sections_of(arg))
    return found


def bounds(metadata: list[Any]) -> list[str]:
    """`> 0`, `≥ 0, < 1`...: the constraints pydantic checks on a value."""
    out = []
    for item in metadata:
        for kind, (attr, text) in BOUNDS.items():
            if isinstance(item, kind):
                out.append(text.format(getattr(item, attr)))
    return out


def type_name(annotation: Any) -> str:
    """A key's type as a reader of YAML thinks of it: `int > 0 or null`, `"a" or "b"`, `list[str]`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Annotated:
        base, *metadata = args
        return " ".join([type_name(base), ", ".join(bounds(metadata))]).strip()
    if origin is Literal:
        return " or ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join(type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def type_of(field: FieldInfo) -> str:
    """The key's type with the bounds pydantic moved off it (`PositiveInt` is `int` + `Gt(0)`)."""
    return " ".join([type_name(field.annotation), ", ".join(bounds(field.metadata))]).strip()


def yaml_value(value: Any) -> str:
    """A default as it would be written in the YAML file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, BaseModel):
        return "(its keys' defaults)"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def default_of(field: FieldInfo) -> str:
    """The key's default, or `required`."""
    if field.default_factory is not None:
        return yaml_value(field.default_factory())  # type: ignore[call-arg]
    if field.default is PydanticUndefined:
        return "required"
    return yaml_value(field.default)


def description_of(field: FieldInfo) -> str:
    """The key's description; a key that holds a section falls back to the section's docstring."""
    if field.description:
        return field.description
    held = sections_of(field.annotation)
    if held and held[0].__doc__:
        return " ".join(held[0].__doc__.split())
    return ""


def cell(text: str) -> str:
    """Markdown table cell: a `|` would end the cell, a line break the row."""
    return " ".join(text.split()).replace("|", "\\|")


def undescribed(
    section: type[BaseModel] = ExperimentConfig, path: str = "", seen: set[type[BaseModel]] | None = None
) -> list[str]:
    """Every key (dotted path, each section once) that has no description: the test wants none."""
    seen = set() if seen is None else seen
    seen.add(section)
    missing = []
    for name, field in section.model_fields.items():
        key = f"{path}{name}"
        if not description_of(field):
            missing.append(key)
        for held in sections_of(field.annotation):
            if held not in seen:
                missing.extend(undescribed(held, f"{key}{'[]' if held_in_list(field) else ''}.", seen))
    return missing


def held_in_list(field: FieldInfo) -> bool:
    """`data.sources` is a list of sections: its keys are written `data.sources[].corpus`."""
    return typing.get_origin(field.annotation) is list or any(
        typing.get_origin(a) is list for a in typing.get_args(field.annotation)
    )


def render_section(
    section: type[BaseModel], path: str, seen: dict[type[BaseModel], str], out: list[str]
) -> None:
    """One table per section, then its sub-sections; a section already written is referred to."""
    seen[section] = path
    doc = " ".join((section.__doc__ or "").split())
    out += [f"## `{path}`", ""] + ([doc, ""] if doc else [])
    out += ["| key | type | default | description |", "|---|---|---|---|"]
    nested: list[tuple[type[BaseModel], str]] = []
    for name, field in section.model_fields.items():
        key = f"{path}.{name}"
        description = description_of(field)
        for held in sections_of(field.annotation):
            sub = f"{key}[]" if held_in_list(field) else key
            if held in seen:
                description += f" (the keys of [`{seen[held]}`](#{anchor(seen[held])}))"
            else:
                nested.append((held, sub))
                description += f" (keys: [`{sub}`](#{anchor(sub)}))"
        out.append(table_row(key, field, description))
    out.append("")
    for held, sub in nested:
        if held not in seen:
            render_section(held, sub, seen, out)


def table_row(key: str, field: FieldInfo, description: str) -> str:
    """One key's row: its name, type, default and description, as table cells."""
    row = [f"`{key}`", f"`{type_of(field)}`", f"`{default_of(field)}`", description]
    return "| " + " | ".join(cell(c) for c in row) + " |"


def anchor(path: str) -> str:
    """The heading id of a section `## \\`data.sources[]\\``, as the docs' slugify (GitHub's) makes it."""
    return "".join(c for c in path.lower() if c.isalnum() or c in "-_")


def render() -> str:
    """The whole page: the top-level keys, then every section in the order the schema declares them."""
    out = [HEADER, "## Top level", "", "| key | type | default | description |", "|---|---|---|---|"]
    seen: dict[type[BaseModel], str] = {ExperimentConfig: ""}
    sections: list[tuple[type[BaseModel], str]] = []
    for name, field in ExperimentConfig.model_fields.items():
        description = description_of(field)
        for held in sections_of(field.annotation):
            sections.append((held, name))
            description += f" (keys: [`{name}`](#{anchor(name)}))"
        out.append(table_row(name, field, description))
    out.append("")
    for held, name in sections:
        if held not in seen:
            render_section(held, name, seen, out)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
    """Print the page, or write it to the path given."""
    text = render()
    if argv:
        Path(argv[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
