"""Every bad input of issue 6 through the real CLI: a clear error naming the problem, and no run started."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tests.conftest import tiny_tree
from tests.test_cotuning import task_file, tree  # noqa: F401  (task_file is a fixture)
from typer.testing import CliRunner

from cotune.cli.main import app
from cotune.config.schema import TinyModelConfig
from cotune.models.tiny import build_tiny_model, byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _write(tmp_path: Path, tree_: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree_))
    return path


def _other_tokenizer_model(tmp_path: Path) -> Path:
    """A local model directory whose tokenizer has one token more than the byte-level one."""
    tok = byte_tokenizer()
    tok.add_tokens(["<extra>"])
    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2), len(tok))
    out = tmp_path / "other-model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _case(name: str, tmp_path: Path, corpus_dir: Path, task: Path) -> tuple[list[str], str]:
    """CLI arguments and the fragment the error must contain."""
    exp = tiny_tree(corpus_dir, tmp_path)
    if name == "malformed-yaml":
        bad = tmp_path / "bad.yaml"
        bad.write_text("model: {name: tiny\n  lora: [\n")
        return ["run", str(bad)], "is not valid YAML"
    if name == "missing-config":
        return ["run", str(tmp_path / "none.yaml")], "does not exist"
    if name == "unknown-key":
        return ["run", str(_write(tmp_path, exp)), "no_such_key=3"], "unknown key 'no_such_key'"
    if name == "mistyped-key":
        return ["run", str(_write(tmp_path, exp)), "federation.round=3"], "did you mean 'rounds'"
    if name == "mistyped-value":
        return [
            "run",
            str(_write(tmp_path, exp)),
            "train.lr=fast",
        ], "'train.lr': Input should be a valid number"
    if name == "missing-data-path":
        return (
            ["run", str(ROOT / "examples/tiny-personalized.yaml"), "data.path=/nonexistent/corpus"],
            "'data.path': the path '/nonexistent/corpus' does not exist",
        )
    if name == "missing-model-path":
        return ["run", str(_write(tmp_path, exp)), "model.name=/nonexistent/model"], "'model.name': the path"
    if name == "unknown-model":
        return ["run", str(_write(tmp_path, exp)), "model.name=no-such-model"], "no-such-model"
    if name == "too-little-text":
        small = tmp_path / "small"
        small.mkdir()
        (small / "a.txt").write_text("just a few words")
        return ["run", str(_write(tmp_path, exp)), f"data.path={small}"], "too little text"
    if name == "choices-across-tokenizers":
        other = _other_tokenizer_model(tmp_path)
        t = tree(task, tmp_path)
        t["llm"]["model"] = {"name": str(other)}
        t["distill"] = {"kd_target": "choices"}
        return ["run", str(_write(tmp_path, t))], "differ between the SLM's and the LLM's tokenizers"
    if name == "lora-target":
        return (
            ["run", str(_write(tmp_path, exp)), "lora.target_modules=[q_proj,no_such_proj]"],
            "['no_such_proj'] are not linear layers of this model; it has: ",
        )
    if name == "simulation-client":
        return (
            ["run", str(_write(tmp_path, exp)), "simulation.attack.clients=[7]"],
            "simulation: client 7 does not exist",
        )
    if name == "dp-with-median":
        args = ["privacy.clip_norm=1.0", "robustness.aggregator=median"]
        return ["run", str(_write(tmp_path, exp)), *args], "needs robustness.aggregator 'mean'"
    raise AssertionError(name)


CASES = [
    "malformed-yaml",
    "missing-config",
    "unknown-key",
    "mistyped-key",
    "mistyped-value",
    "missing-data-path",
    "missing-model-path",
    "unknown-model",
    "too-little-text",
    "choices-across-tokenizers",
    "lora-target",
    "simulation-client",
    "dp-with-median",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_a_clear_error_and_starts_no_run(name, tmp_path, corpus_dir, task_file):  # noqa: F811
    args, fragment = _case(name, tmp_path, corpus_dir, task_file)
    out = tmp_path / "runs"
    if name not in ("malformed-yaml", "missing-config", "missing-data-path"):
        args += ["--out", str(out / "x")]
    result = runner.invoke(app, args)
    text = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 2, result.output
    assert "error:" in text and " ".join(fragment.split()) in text, result.output
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())  # no run directory left behind


@pytest.mark.slow
def test_resume_with_a_checkpoint_from_another_config_is_refused_before_loading(corpus_dir, tmp_path):
    exp = _write(tmp_path, tiny_tree(corpus_dir, tmp_path, federation={"rounds": 1}))
    out = tmp_path / "r"
    assert runner.invoke(app, ["run", str(exp), "--out", str(out)]).exit_code == 0
    cfg = out / "config.yaml"
    cfg.write_text(cfg.read_text().replace("lr: 0.01", "lr: 0.02"))
    metrics = (out / "metrics.jsonl").read_text()
    result = runner.invoke(app, ["run", "--resume", str(out)])
    assert result.exit_code == 2
    assert "written by a different config; cannot resume" in " ".join(result.output.split())
    assert "model tiny" not in result.output  # refused before the model was loaded
    assert (out / "metrics.jsonl").read_text() == metrics
