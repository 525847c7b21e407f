"""bench/generation_quality.py: clients are averaged within their seed before any interval, validation trust
is paired with each baseline by seed, a seed counts only when all four strategies finished it, and a sweep
reruns only the seeds not finished (from scratch). Synthetic run directories: no model, seconds."""

import json
import math
from pathlib import Path

import pytest
from tests.conftest import load_bench_script

from cotune.reporting.stats import summarize

BENCH = Path(__file__).resolve().parents[1] / "bench" / "generation_quality.py"


@pytest.fixture(scope="module")
def bench():
    return load_bench_script(BENCH, "generation_quality_bench")


def write_run(d: Path, rouge: list[float], ppl: list[float], ended: bool = True) -> None:
    """A personalized run directory: round 0 and round 2 test generations per client, then the end."""
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(
        "algorithm: personalized\nmodel: {name: tiny}\nfederation: {clients: 2, rounds: 2}\n"
        f"strategy: {{name: {d.name.rsplit('.', 1)[-1] if '.' in d.name else 'validation'}}}\n"
    )
    lines = [{"type": "run", "event": "start", "strategy": "x", "clients": 2}]
    for rnd, values in ((0, ([0.1, 0.1], [50.0, 50.0])), (2, (rouge, ppl))):
        for client, (r, p) in enumerate(zip(*values, strict=True)):
            lines.append(
                {"type": "gen", "round": rnd, "n": 4, "exact_match": 0.0, "f1": r, "rouge_l": r, "ppl": p}
                | {"split": "test", "model": None, "client": client}
            )
    if ended:
        lines.append({"type": "run", "event": "end"})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))


# validation's ROUGE-L per seed and client; local is 0.1 lower on client 0 and equal on client 1, so the
# paired difference per seed is (0.1 + 0) / 2 = 0.05 on every seed but seed 2, where it is 0.02 / 2
VALIDATION = {0: [0.5, 0.3], 1: [0.6, 0.2], 2: [0.4, 0.4], 3: [0.9, 0.9]}
LOCAL_GAP = {0: 0.1, 1: 0.1, 2: 0.02, 3: 0.5}


def make_seed(bench, root: Path, seed: int, local_ended: bool = True) -> None:
    dirs = bench.run_dirs(root, "headlines", seed)
    v = VALIDATION[seed]
    write_run(dirs["validation"], v, [20.0, 30.0])
    write_run(dirs["local"], [v[0] - LOCAL_GAP[seed], v[1]], [22.0, 30.0], ended=local_ended)
    write_run(dirs["fedavg"], v, [20.0, 30.0])  # identical to validation
    write_run(dirs["prediction"], [v[0] + 0.2, v[1]], [19.0, 29.0])


def test_clients_are_nested_in_seeds_and_differences_paired_by_seed(bench, tmp_path):
    for seed in (0, 1, 2):
        make_seed(bench, tmp_path, seed)
    make_seed(bench, tmp_path, 3, local_ended=False)  # a seed one strategy did not finish: left out
    body = bench.collect(["headlines"], [0, 1, 2, 3], tmp_path)["settings"]["headlines"]
    assert body["seeds"] == [0, 1, 2]
    rouge = body["strategies"]["validation"]["rouge_l"]
    assert rouge["seed_means"] == {"0": pytest.approx(0.4), "1": pytest.approx(0.4), "2": pytest.approx(0.4)}
    assert rouge["summary"]["n"] == 3  # seeds, not 6 (seed, client) pairs
    local = body["paired"]["rouge_l"]["local"]
    assert local["by_seed"] == {"0": pytest.approx(0.05), "1": pytest.approx(0.05), "2": pytest.approx(0.01)}
    expected = summarize([0.05, 0.05, 0.01])
    assert local["summary"]["low"] == pytest.approx(expected.low)
    assert local["summary"]["high"] == pytest.approx(expected.high)
    assert expected.low is not None and expected.low < 0 < expected.high  # 2 df: a wide interval
    assert local["verdict"] == "not significant" and local["better"] is None
    fedavg = body["paired"]["rouge_l"]["fedavg"]  # identical runs: difference exactly 0 on every seed
    assert fedavg["by_seed"] == {"0": 0.0, "1": 0.0, "2": 0.0} and fedavg["verdict"] == "not significant"
    pred = body["paired"]["ppl"]["prediction"]  # validation's perplexity 1 higher on every seed
    assert pred["summary"]["mean"] == pytest.approx(1.0) and pred["summary"]["se"] == pytest.approx(0.0)
    # prediction's lower perplexity is the better one: the verdict names it, not validation
    assert pred["verdict"] == "significant" and pred["better"] == "prediction"
    before = body["before_training"]["rouge_l"]["seed_means"]
    assert all(math.isclose(v, 0.1) for v in before.values())
    text = bench.markdown(
        {"settings": {"headlines": body}, "machine": "m", "torch": "t", "commit": "c", "command": "cmd"}
    )
    assert "| local | +3.67 ± " in text  # ROUGE-L difference in points: 100 x mean(0.05, 0.05, 0.01)
    assert "significant (prediction better)" in text
    assert "seed 0: not recorded" in text  # no commit file beside these runs


def test_a_sweep_reruns_only_unfinished_seeds_from_scratch(bench, tmp_path, monkeypatch):
    make_seed(bench, tmp_path, 0)
    make_seed(bench, tmp_path, 1, local_ended=False)
    ran = []

    def fake_run(setting, seed, overrides, out):
        assert not any(d.exists() for d in bench.run_dirs(tmp_path, setting, seed).values())
        ran.append((setting, seed, overrides, out))
        make_seed(bench, tmp_path, seed)
        return 1.0

    monkeypatch.setattr(bench, "run_one", fake_run)
    timings = bench.sweep(["headlines"], [0, 1], tmp_path, ["model.name=tiny"])
    assert ran == [("headlines", 1, ["model.name=tiny"], tmp_path / "headlines" / "s1")]
    assert timings == {"headlines/s1": 1.0}
    assert bench.commit_file(tmp_path, "headlines", 1).read_text().strip()
    assert not bench.commit_file(tmp_path, "headlines", 0).exists()  # kept seed: not touched
