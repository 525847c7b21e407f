"""`local` (each client keeps its own adapter, nothing mixed, nothing measured about the others) moves no
bytes: its traffic records are zero and the report says that nothing travels."""

from __future__ import annotations

import json

import pytest
import yaml
from tests.conftest import tiny_tree
from typer.testing import CliRunner

from cotune.cli.main import app
from cotune.config.names import STRATEGY_SPECS

runner = CliRunner()


def comm(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "comm"]


def test_only_local_exchanges_nothing():
    assert [name for name, spec in STRATEGY_SPECS.items() if not spec.exchanges] == ["local"]


@pytest.mark.slow
def test_local_logs_zero_traffic_and_the_report_says_nothing_travels(corpus_dir, tmp_path):
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_tree(corpus_dir, tmp_path, run={"compare": ["local"]})))
    out = tmp_path / "r"
    result = runner.invoke(app, ["run", str(cfg_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    local, fedavg = comm(tmp_path / "r.local"), comm(out)
    assert {(c["round"], c["client"]) for c in local} == {(r, k) for r in (1, 2) for k in range(4)}
    assert all(c["bytes_up"] == 0 and c["bytes_down"] == 0 and c["ratio"] == 0 for c in local)
    assert all(c["bytes_up"] > 0 and c["bytes_down"] > 0 for c in fedavg)  # the same loop counts fedavg's
    report = runner.invoke(
        app, ["report", str(out), str(tmp_path / "r.local"), "--out", str(tmp_path / "rep")]
    )
    assert report.exit_code == 0, report.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Nothing travels in local" in text
    assert "Nothing travels in fedavg" not in text
