"""Config errors name the key and what was expected, and start no training."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tests.conftest import tiny_tree

from cotune.config import ConfigError, config_from_dict, load_config
from cotune.config.loader import apply_overrides


def write(tmp_path: Path, tree: dict) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_overrides_are_typed_and_nested(corpus_dir, tmp_path):
    cfg = load_config(
        write(tmp_path, tiny_tree(corpus_dir, tmp_path)), ["train.lr=1e-3", "federation.rounds=3"]
    )
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.federation.rounds == 3
    assert cfg.run.name == "t"


def test_unknown_top_level_key_is_named(corpus_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'no_such_key'"):
        load_config(write(tmp_path, tiny_tree(corpus_dir, tmp_path)), ["no_such_key=3"])


def test_unknown_nested_key_suggests_the_right_one(corpus_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr' \(did you mean 'lr'\?\)"):
        load_config(write(tmp_path, tiny_tree(corpus_dir, tmp_path)), ["train.lrr=1"])


def test_wrong_type_names_key_and_value(corpus_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"'federation.rounds'.*integer.*'many'"):
        load_config(write(tmp_path, tiny_tree(corpus_dir, tmp_path)), ["federation.rounds=many"])


def test_missing_data_path_is_named(corpus_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"'data\.path': the path '/nonexistent/corpus' does not exist"):
        load_config(write(tmp_path, tiny_tree(corpus_dir, tmp_path)), ["data.path=/nonexistent/corpus"])


def test_missing_model_file_is_named(corpus_dir, tmp_path):
    tree = tiny_tree(corpus_dir, tmp_path, model={"name": "/no/such/model.gguf"})
    with pytest.raises(ConfigError, match=r"'model\.name'.*does not exist"):
        config_from_dict(tree)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: tiny\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_override_into_a_value_is_rejected():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"train": {"lr": 1.0}}, ["train.lr.x=2"])


def test_cli_config_error_starts_no_training(corpus_dir, tmp_path):
    from typer.testing import CliRunner

    from cotune.cli.main import app

    path = write(tmp_path, tiny_tree(corpus_dir, tmp_path))
    result = CliRunner().invoke(app, ["run", str(path), "no_such_key=3"])
    assert result.exit_code == 2
    assert "no_such_key" in result.output
    assert not (tmp_path / "runs").exists()


def test_every_shipped_example_config_is_valid():
    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
    assert len(examples) >= 5
    for path in examples:
        cfg = load_config(path)
        assert cfg.federation.clients >= 2, path.name
