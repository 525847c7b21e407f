"""The docs: the config reference is the schema's own (every key described, the committed page current),
the README's example is a valid config, and the site builds strictly (mkdocs.yml, `make docs`)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from cotune.config import load_config

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "PYTHONPATH=src python scripts/config_reference.py docs/config-reference.md"


def reference_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "config_reference", ROOT / "scripts" / "config_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_config_key_has_a_description():
    missing = reference_script().undescribed()
    assert not missing, (
        "config keys without Field(description=...) in src/cotune/config/schema.py (a key holding a "
        f"section may use its section's docstring): {missing}"
    )


def test_the_config_reference_lists_every_key_with_its_default():
    page = reference_script().render()
    for key, default in [
        ("train.lr", "0.002"),
        ("data.sources[].corpus", "required"),
        ("data.columns.prompt", "prompt"),  # task.columns: the same section (GenerationSettings)
        ("simulation.faults[].seconds", "0.0"),
        ("privacy.delta", "1e-05"),
    ]:
        assert re.search(rf"^\| `{re.escape(key)}` \| `[^`]+` \| `{re.escape(default)}` \| \S", page, re.M), (
            key
        )


def test_the_committed_config_reference_is_current():
    committed = (ROOT / "docs" / "config-reference.md").read_text(encoding="utf-8")
    assert committed == reference_script().render(), f"docs/config-reference.md is stale: run {REGENERATE}"


def test_the_readme_example_is_a_valid_config(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## An example in 10 lines", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) <= 10
    for owner in "abcd":  # the owners' folders the example names, each with one document
        (tmp_path / "owners" / owner).mkdir(parents=True)
        (tmp_path / "owners" / owner / "notes.txt").write_text(f"the notes of owner {owner}\n")
    (tmp_path / "owners.yaml").write_text(block)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(tmp_path / "owners.yaml", [])
    assert cfg.strategy.name == "validation" and cfg.data.clients is not None and len(cfg.data.clients) == 4


def test_the_docs_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    env = {
        "NO_MKDOCS_2_WARNING": "1",
        "PATH": str(Path(sys.executable).parent),
        "PYTHONPATH": str(ROOT / "src"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    pages = [
        "index",
        "methods",
        "config",
        "data",
        "outputs",
        "cli",
        "robustness",
        "config-reference",
        "bench",
    ]
    for page in pages:
        html = tmp_path / "site" / ("index.html" if page == "index" else f"{page}/index.html")
        assert html.is_file(), page
    reference = (tmp_path / "site" / "config-reference" / "index.html").read_text(encoding="utf-8")
    assert "<code>train.lr</code>" in reference
