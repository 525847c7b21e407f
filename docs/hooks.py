"""MkDocs hooks (mkdocs.yml `hooks:`): pages made at build time from the repository, none copied by hand.

- `config-reference.md`: rendered afresh from the pydantic schema by `scripts/config_reference.py` (the
  committed copy, for reading on GitHub, is checked to be the same by tests/test_docs.py).
- `bench/index.md` (and the tables and plots it links, under `bench/results/`): bench/README.md itself.
- Links from a page under docs/ to a file of the repository outside it (`../examples/x.yaml`, valid
  on GitHub) become plain text naming that file, and `../bench/README.md#...` the benchmarks page.
- A pipe in code in a table cell, escaped for GitHub, loses its backslash (Python-Markdown needs none).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
CODE_SPAN = re.compile(r"`[^`\n]*`")
OUTSIDE_LINK = re.compile(r"\[([^\]]+)\]\(\.\./([^)#\s]+)(#[^)\s]*)?\)")


def config_reference() -> str:
    """The page from scripts/config_reference.py (a script, not a module of the package)."""
    spec = importlib.util.spec_from_file_location(
        "config_reference", ROOT / "scripts" / "config_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.render())


def on_files(files: Files, config: Any) -> Files:
    """Add bench/README.md and the results it links to the site."""
    bench = ROOT / "bench"
    files.append(File.generated(config, "bench/index.md", abs_src_path=str(bench / "README.md")))
    for path in sorted((bench / "results").glob("*")):
        if path.suffix in {".md", ".png"} and path.is_file():
            files.append(File.generated(config, f"bench/results/{path.name}", abs_src_path=str(path)))
    return files


def outside_link(match: re.Match[str]) -> str:
    """A link to the repository outside docs/: the benchmarks page, or the file's name as text."""
    text, target, anchor = match.group(1), match.group(2), match.group(3) or ""
    if target == "bench/README.md":
        return f"[{text}](bench/index.md{anchor})"
    return text if text.strip("`") == target else f"{text} (`{target}`)"


def table_code_pipes(markdown: str) -> str:
    """GitHub wants `a\\|b` for a pipe in code in a table cell and shows `a|b`; Python-Markdown's tables
    already keep a pipe inside code in its cell and would show the backslash: drop it there."""
    return "\n".join(
        CODE_SPAN.sub(lambda m: m.group(0).replace("\\|", "|"), line) if line.startswith("|") else line
        for line in markdown.split("\n")
    )


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """The config reference from the schema as it is now; links that only make sense in the repository
    rewritten (pages at docs/ top level only)."""
    if page.file.src_uri == "config-reference.md":
        return config_reference()
    markdown = table_code_pipes(markdown)
    if "/" in page.file.src_uri:
        return markdown
    return OUTSIDE_LINK.sub(outside_link, markdown)
