"""Reports and privacy under P12: per-run client labels, names with control characters, atomic report
files, meaningless DP settings, the report's privacy section, caches kept in the run directory, and the
docs' MLflow read-back command (docs/outputs.md) run as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.conftest import tiny_tree
from typer.testing import CliRunner

from cotune.cli.main import app
from cotune.reporting.text import printable

ROOT = Path(__file__).resolve().parents[1]
ESC = "\x1b"
NASTY = ["\x1b[2Jwiped", "\x1b]0;title\x07owner"]


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def _config(tmp_path: Path, tree: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


def _hand_run(d: Path, strategy: str, names: list[str]) -> Path:
    """A finished run directory written by hand: its config, start record and final perplexities."""
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"strategy": {"name": strategy}}))
    records = [{"type": "run", "event": "start", "strategy": strategy, "client_names": names}]
    records += [
        {"type": "eval", "round": 1, "client": c, "split": "test", "ppl": 10.0 + c, "loss": 2.3}
        for c in range(len(names))
    ]
    records.append({"type": "run", "event": "end"})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


# ---- item 9: report labels clients per run --------------------------------------------------------------


def test_report_of_runs_with_different_owners_labels_clients_per_run(tmp_path):
    a = _hand_run(tmp_path / "a", "fedavg", ["business", "sport"])
    b = _hand_run(tmp_path / "b", "local", ["politics", "tech"])
    result = _invoke(["report", str(a), str(b)])
    assert result.exit_code == 0, result.output
    md = (a / "report.md").read_text()
    assert "| 0 (fedavg: business; local: politics) |" in md
    assert "| 1 (fedavg: sport; local: tech) |" in md
    assert "fedavg: business; local: politics" in " ".join(result.output.split())


def test_runs_of_the_same_owners_keep_one_name_per_row(tmp_path):
    a = _hand_run(tmp_path / "a", "fedavg", ["business", "sport"])
    b = _hand_run(tmp_path / "b", "local", ["business", "sport"])
    assert _invoke(["report", str(a), str(b)]).exit_code == 0
    assert "| 0 (business) |" in (a / "report.md").read_text()


# ---- item 4: names sanitised before a terminal or a report --------------------------------------------


def test_printable_escapes_control_characters_and_bounds_length():
    assert printable("\x1b[2J") == "\\x1b[2J"
    assert printable("\x1b]0;t\x07") == "\\x1b]0;t\\x07"
    assert printable("a\u202eb\nc") == "a\\u202eb\\x0ac"
    assert printable("naïve/ü") == "naïve/ü"
    assert len(printable("x" * 500)) == 80


def test_escape_sequences_in_names_never_reach_the_terminal_or_report(tmp_path):
    run_dir = _hand_run(tmp_path / "run", "fedavg", NASTY)
    other = _hand_run(tmp_path / f"b{ESC}[2J", "fedavg", ["a", "b"])  # same label: its dir name is shown
    result = _invoke(["report", str(run_dir), str(other)])
    assert result.exit_code == 0, result.output
    md = (run_dir / "report.md").read_text()
    assert ESC not in result.output and "\x07" not in result.output
    assert ESC not in md and "\x07" not in md
    assert "\\x1b[2Jwiped" in md


def test_owner_folders_with_escape_sequences_in_a_real_run(corpus_dir, tmp_path):
    owners = []
    for label, nasty in zip(["alpha", "beta"], NASTY, strict=True):
        owners.append(tmp_path / "owners" / nasty)
        shutil.copytree(corpus_dir / label, owners[-1])
    tree = tiny_tree(corpus_dir, tmp_path, strategy={"name": "fedavg"})
    del tree["data"]["path"]
    tree["data"]["clients"] = [str(p) for p in owners]
    tree["federation"] = {**tree["federation"], "clients": 2, "rounds": 1}
    result = _invoke(["run", str(_config(tmp_path, tree))])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "runs" / "t" / "report.md").read_text()
    assert ESC not in result.output and ESC not in md and "\x07" not in md


# ---- item 6: report files replaced atomically -----------------------------------------------------------


def test_a_report_killed_mid_write_leaves_the_old_files_whole(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    run_dir = _hand_run(tmp_path / "a", "fedavg", ["x", "y"])
    assert _invoke(["report", str(run_dir)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in [run_dir / "report.md", *(run_dir / "plots").iterdir()]}

    def cut_savefig(self, fname, **kw):  # half a PNG written, then the process "dies"
        Path(fname).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", cut_savefig)
    with pytest.raises(KeyboardInterrupt):
        from cotune.reporting.report import write_report

        write_report([run_dir])
    monkeypatch.undo()

    real_write_text = Path.write_text

    def cut_write_text(self, data, *a, **kw):
        real_write_text(self, data[:10], *a, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", cut_write_text)
    with pytest.raises(OSError):
        write_report([run_dir])
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in [run_dir / "report.md", *(run_dir / "plots").iterdir()]}
    assert after == before  # no truncated file, and no temporary file left beside them


# ---- item 8: DP settings that give no guarantee; the report's privacy section ------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("privacy.noise_multiplier=1.0", "privacy.noise_multiplier needs privacy.clip_norm"),
        ("privacy.seed=3", "privacy.seed without privacy.clip_norm"),
        ("privacy.delta=1e-3", "privacy.delta without privacy.clip_norm"),
    ],
)
def test_dp_settings_that_nothing_reads_are_refused_before_any_work(corpus_dir, tmp_path, override, expected):
    result = _invoke(["run", str(_config(tmp_path, tiny_tree(corpus_dir, tmp_path))), override])
    assert result.exit_code == 2 and expected in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists()


def test_a_delta_that_allows_publishing_a_client_is_refused(corpus_dir, tmp_path):
    args = ["privacy.clip_norm=1.0", "privacy.noise_multiplier=1.0", "privacy.delta=0.5"]
    result = _invoke(["run", str(_config(tmp_path, tiny_tree(corpus_dir, tmp_path))), *args])
    assert result.exit_code == 2 and "1/federation.clients" in " ".join(result.output.split())


def test_clipping_without_noise_warns_and_the_report_says_no_guarantee(corpus_dir, tmp_path):
    tree = tiny_tree(corpus_dir, tmp_path, federation={"rounds": 1}, privacy={"clip_norm": 0.1})
    result = _invoke(["run", str(_config(tmp_path, tree))])
    assert result.exit_code == 0, result.output
    assert "NO differential privacy guarantee" in " ".join(result.output.split())
    md = (tmp_path / "runs" / "t" / "report.md").read_text()
    assert "## Differential privacy" in md and "∞ (no noise: no privacy guarantee)" in md


@pytest.mark.slow
def test_report_has_a_privacy_section_whenever_dp_is_on(corpus_dir, tmp_path):
    privacy = {"clip_norm": 0.1, "noise_multiplier": 1.0, "seed": 0}
    tree = tiny_tree(corpus_dir, tmp_path, federation={"rounds": 2}, privacy=privacy)
    result = _invoke(["run", str(_config(tmp_path, tree))])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    md = (tmp_path / "runs" / "t" / "report.md").read_text()
    section = md.split("## Differential privacy", 1)[1]
    row = next(line for line in section.splitlines() if line.startswith("| fedavg"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0 and cells[2:7] == ["1e-05", "0.1", "1", "1", "2"]
    assert "RDP accountant" in section
    plain = tiny_tree(corpus_dir, tmp_path / "plain")
    assert _invoke(["run", str(_config(tmp_path, plain, "plain.yaml"))]).exit_code == 0
    assert "Differential privacy" not in (tmp_path / "plain" / "runs" / "t" / "report.md").read_text()


# ---- items 2 and 6: MLflow read-back as docs/outputs.md writes it; caches inside the run directory ---------


def _readme_command(prefix: str) -> str:
    text = (ROOT / "docs" / "outputs.md").read_text()
    section = text.split("## Experiment trackers", 1)[1].split("\n## ", 1)[0]
    (line,) = [ln for ln in section.splitlines() if ln.startswith(prefix)]
    return line


@pytest.mark.slow
def test_the_readme_mlflow_read_back_works_as_written(corpus_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tree = tiny_tree(corpus_dir, tmp_path, run={"loggers": ["mlflow"], "name": "tiny-personalized"})
    tree["run"]["out_dir"] = "runs"
    monkeypatch.chdir(tmp_path)
    assert _invoke(["run", str(_config(tmp_path, tree))]).exit_code == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = _readme_command("MLFLOW_ALLOW_FILE_STORE=true python -c")
    out = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = {int(m[1]): float(m[2]) for m in re.finditer(r"round/mean_val_ppl (\d+) (\S+)", out.stdout)}
    rounds = [json.loads(x) for x in (tmp_path / "runs/tiny-personalized/metrics.jsonl").read_text().split()]
    want = {r["round"]: r["mean_val_ppl"] for r in rounds if r["type"] == "round"}
    assert got and got == pytest.approx(want)


@pytest.mark.slow
def test_a_run_writes_no_cache_outside_its_directory(corpus_dir, tmp_path):
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), tmp.mkdir()
    tree = tiny_tree(corpus_dir, tmp_path, federation={"rounds": 1}, run={"loggers": ["mlflow"]})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MPL", "TORCHINDUCTOR"))}
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=str(ROOT / "src"))
    code = "from cotune.cli.main import cli; cli()"
    args = [sys.executable, "-c", code, "run", str(_config(tmp_path, tree))]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == []
    # torch._dynamo makes an empty $TMPDIR/torchinductor_<user> when imported, before the run dir is known
    assert [p for p in tmp.rglob("*") if p.is_file()] == []
    assert (tmp_path / "runs" / "t" / ".cache" / "matplotlib").is_dir()
