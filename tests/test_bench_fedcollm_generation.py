"""bench/fedcollm_quality.py on a generation task: per seed and over seeds the seven figures of the FedCoLLM
table in ROUGE-L, exact match, F1 and response perplexity, with the 95% t interval, and FedCoLLM paired by
seed against each baseline with its verdict. Hand-written run directories (seconds), and one end-to-end
sweep of two seeds with the tiny models that is then killed and resumed (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.conftest import load_bench_script

from cotune.reporting.stats import summarize

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "fedcollm_quality.py"
FIGURE_LABELS = [
    "SLM zero-shot",
    "SLM standalone (mean over clients)",
    "SLM FedAvg",
    "SLM FedAvg + server fine-tuning (λ=0)",
    "SLM FedCoLLM",
    "LLM zero-shot",
    "LLM centralized",
    "LLM FedCoLLM",
]
PAIRS = [
    "SLM FedCoLLM − FedAvg",
    "SLM FedCoLLM − control (λ=0)",
    "SLM FedCoLLM − standalone",
    "LLM FedCoLLM − LLM zero-shot",
    "LLM FedCoLLM − centralized",
]
DECOMPOSITION = ["SLM control (λ=0) − FedAvg: the public labels' share"]  # shown, not claimed


@pytest.fixture(scope="module")
def bench():
    return load_bench_script(BENCH, "fedcollm_quality_gen_bench")


def gen(rnd: int, model: str, rouge: float, client: int | None = None, ppl: float = 10.0) -> dict:
    scores = {"n": 200, "exact_match": rouge / 2, "f1": rouge, "rouge_l": rouge, "ppl": ppl}
    return {"type": "gen", "round": rnd, **scores, "split": "test", "model": model, "client": client}


def write_run(d: Path, algorithm: str, records: list[dict]) -> None:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(
        f"algorithm: {algorithm}\nmodel: {{name: tiny}}\ntask: {{kind: generation, max_new_tokens: 8}}\n"
        "federation: {clients: 2, rounds: 2}\nrun: {seed: 0}\n"
    )
    lines = [
        {"type": "run", "event": "start", "algorithm": algorithm},
        *records,
        {"type": "run", "event": "end"},
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


# SLM FedCoLLM's and FedAvg's final ROUGE-L per seed; the paired difference is 0.1 and 0.2 (mean 0.15,
# s.e. 0.05, 1 df: the interval 0.15 ± 12.71 x 0.05 covers 0)
FEDCOLLM = {0: 0.5, 1: 0.6}
FEDAVG = {0: 0.4, 1: 0.4}
CONTROL = {0: 0.45, 1: 0.5}  # FedAvg + the server steps with lambda = 0: FedCoLLM leads it by 0.05, 0.1


def make_seed(bench, out: Path, seed: int) -> None:
    """A seed's six runs: zero-shot 0.1 (SLM) / 0.3 (LLM); standalone clients 0.2 and 0.4 (mean 0.3); the
    LLM 0.2 higher than zero-shot under FedCoLLM on every seed, and centralized equal to it."""
    run, zero_shot, standalone, fedavg, control, centralized = bench.dirs_for(out)
    zero = [gen(0, "slm", 0.1), gen(0, "llm", 0.3)]
    write_run(run, "fedcollm", [*zero, gen(2, "slm", FEDCOLLM[seed]), gen(2, "llm", 0.5, ppl=float("inf"))])
    write_run(zero_shot, "zero_shot", zero)
    write_run(standalone, "standalone", [zero[0], gen(2, "slm", 0.2, client=0), gen(2, "slm", 0.4, client=1)])
    write_run(fedavg, "fedavg", [zero[0], gen(2, "slm", FEDAVG[seed])])
    write_run(control, "fedavg_ft", [zero[0], gen(2, "slm", CONTROL[seed])])
    write_run(centralized, "centralized", [zero[1], gen(2, "llm", 0.5)])


def test_generation_figures_over_seeds_and_paired_differences(bench, tmp_path):
    outs = {s: tmp_path / "runs" / f"seed-{s}" / "run" for s in (0, 1)}
    for s, out in outs.items():
        make_seed(bench, out, s)
    done = {str(s): bench.collect_seed(out) for s, out in outs.items()}
    rouge = done["0"]["rouge_l"]
    assert rouge["slm_standalone"] == pytest.approx(0.3)  # the mean over the clients
    assert rouge["slm_zero_shot"] == 0.1 and rouge["llm_zero_shot"] == 0.3 and rouge["llm_fedcollm"] == 0.5
    assert done["0"]["exact_match"]["slm_fedcollm"] == 0.25
    assert done["0"]["ppl"]["llm_fedcollm"] is None  # an infinite perplexity is missing, not averaged
    assert done["0"]["test_examples"] == 200

    header, rows = bench.metric_table(bench.GENERATION, bench.GENERATION.metrics[0], done, 200)
    assert header == ["setting", "seed 0", "seed 1", "mean ± s.e. over seeds", "95% t interval", "verdict"]
    by_label = {r[0]: r for r in rows}
    assert list(by_label) == FIGURE_LABELS + PAIRS + DECOMPOSITION
    expected = summarize([0.1, 0.2])
    low, high = 100 * expected.low, 100 * expected.high
    assert by_label["SLM FedCoLLM − FedAvg"] == [
        "SLM FedCoLLM − FedAvg",
        "+10.00",
        "+20.00",
        "+15.00 ± 5.00",
        f"{low:+.2f} to {high:+.2f}",
        "not significant",
    ]
    assert by_label["SLM FedCoLLM − control (λ=0)"][1:4] == ["+5.00", "+10.00", "+7.50 ± 2.50"]
    # the two parts add up to FedCoLLM − FedAvg on every seed: 0.05 + 0.05, 0.1 + 0.1
    assert by_label[DECOMPOSITION[0]][1:4] == ["+5.00", "+10.00", "+7.50 ± 2.50"]
    assert by_label["SLM FedCoLLM"][1:4] == ["50.00", "60.00", "55.00 ± 5.00"]
    assert by_label["LLM FedCoLLM − centralized"][-1] == "not significant"  # exactly 0 on both seeds
    # the LLM gains 0.2 on every seed: s.e. 0, an interval of one point, which excludes 0
    assert by_label["LLM FedCoLLM − LLM zero-shot"][3:] == [
        "+20.00 ± 0.00",
        "+20.00 to +20.00",
        "significant",
    ]
    claims = bench.gen_claims(done)
    assert claims["LLM FedCoLLM − LLM zero-shot (test ROUGE-L (×100))"].startswith(
        "significant, FedCoLLM better"
    )
    assert claims["SLM FedCoLLM − FedAvg (test ROUGE-L (×100))"].startswith("not significant")
    assert not any("perplexity" in k for k in claims)  # ROUGE-L and exact match are the claims
    assert not any("public labels" in k for k in claims)  # the decomposition is shown, not claimed


def tiny_config(path: Path) -> Path:
    """examples/fedcollm-headlines-tiny.yaml cut to the fewest articles, rounds and tokens."""
    cfg = yaml.safe_load((ROOT / "examples" / "fedcollm-headlines-tiny.yaml").read_text())
    cfg["device"] = "cpu"
    cfg["task"].update(
        {"source": {"corpus": "bbc", "max_docs": 6}, "max_test_examples": 4, "max_new_tokens": 4}
    )
    cfg["federation"].update({"clients": 2, "rounds": 1, "local_steps": 1})
    cfg["distill"]["max_steps"] = 1
    cfg["run"]["threads"] = 1
    path.write_text(yaml.safe_dump(cfg))
    return path


def tables(md: str) -> list[str]:
    """The table lines of a results file."""
    return [line for line in md.splitlines() if line.startswith("|")]


@pytest.mark.slow
def test_generation_sweep_end_to_end_with_two_seeds_resumes_a_killed_seed(tmp_path):
    config = tiny_config(tmp_path / "headlines.yaml")
    results = tmp_path / "results"
    cmd = [
        sys.executable,
        str(BENCH),
        "--config",
        str(config),
        "--name",
        "gen",
        "--runs",
        str(tmp_path / "runs"),
    ]
    cmd += ["--results", str(results), "--seeds", "0", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def sweep() -> str:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    sweep()
    md = (results / "fedcollm_quality_gen.md").read_text()
    for label in (
        "test ROUGE-L",
        "test exact match",
        "test token F1",
        "test perplexity of the reference responses",
    ):
        assert f"**{label}" in md
    rows = tables(md)
    assert rows[0] == "| setting | seed 0 | seed 1 | mean ± s.e. over seeds | 95% t interval | verdict |"
    for label in FIGURE_LABELS + PAIRS:
        assert sum(r.startswith(f"| {label} |") for r in rows) == 4  # one row in each metric's table
    res = json.loads((results / "fedcollm_quality_gen.json").read_text())
    assert res["task_kind"] == "generation" and res["seeds"] == ["0", "1"] and res["test_examples"] == 4
    for metric in ("rouge_l", "exact_match", "f1", "ppl"):
        assert set(res["aggregate"][metric]) == {
            "slm_zero_shot",
            "slm_standalone",
            "slm_fedavg",
            "slm_fedavg_ft",
            "slm_fedcollm",
            "llm_zero_shot",
            "llm_centralized",
            "llm_fedcollm",
        }
        for summary in res["aggregate"][metric].values():
            assert summary["n"] == 2 and summary["low"] is not None and summary["high"] is not None
    pair = res["paired"]["ppl"]["SLM FedCoLLM − FedAvg"]
    per_seed = res["per_seed"]
    diffs = [per_seed[s]["ppl"]["slm_fedcollm"] - per_seed[s]["ppl"]["slm_fedavg"] for s in ("0", "1")]
    assert pair["by_seed"] == {"0": pytest.approx(diffs[0]), "1": pytest.approx(diffs[1])}
    assert pair["summary"]["low"] == pytest.approx(summarize(diffs).low)
    assert set(res["paired"]["rouge_l"]) == set(PAIRS + DECOMPOSITION)
    assert all(res["commits_by_seed"][s] for s in ("0", "1"))  # the code that ran each seed

    # seed 1 killed: centralized never started, fedavg stopped before its final evaluation
    seed1 = tmp_path / "runs" / "gen" / "seed-1"
    for d in (seed1 / "run.centralized",):
        subprocess.run(["rm", "-r", str(d)], check=True)
    metrics = seed1 / "run.fedavg" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    cut = next(i for i, x in enumerate(lines) if '"type":"gen"' in x and '"round":1' in x)
    metrics.write_text("\n".join(lines[:cut]) + "\n")
    out = sweep()
    assert "[keep]" in out and "seed-0" in out.split("[keep]")[1].splitlines()[0]
    assert f"run --resume {seed1 / 'run'}" in out
    assert tables((results / "fedcollm_quality_gen.md").read_text()) == rows  # the same figures
