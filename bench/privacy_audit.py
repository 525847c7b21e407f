"""What each personalized strategy's released adapters reveal, with and without client-level DP (issue 33).

For one setting config (default bench/configs/pq-bbc-topic.yaml: SmolLM2-135M, BBC, one topic per
client) and every seed:

* without DP, one `cotune run` (one model load) trains validation trust and, through `run.compare`, local,
  fedavg and prediction trust on identical data and initialisation;
* with client-level DP at each target epsilon (default 1, 4, 8 at the config's privacy.delta), one run of
  validation trust with fedavg and prediction trust compared: `privacy.clip_norm` is C, the median update
  norm of a clip-only probe run of fedavg (seed 0, no noise; measured once, kept in the runs root), and
  `privacy.noise_multiplier` the sigma whose accounted epsilon after `federation.rounds` aggregations is the
  target (`cotune.algorithms.privacy.epsilon_spent`, bisection). `local` has no DP variant: nothing of it is
  aggregated, so DP on the exchange does not touch its adapter;
* then `cotune audit RUN_DIR --max-examples N` on every run directory: membership inference on each client's
  final adapter (its training windows against its held-out test windows), the loss-threshold and the
  reference-calibrated attacks, ROC AUC and TPR at 1% FPR.

Collected per (DP level, strategy): each figure averaged over a seed's clients, then over seeds (mean,
standard error, t interval: `reporting.stats`), next to the final test perplexity and the epsilon the run
logged. Run directories go to runs/bench/privacy/<level>/s<seed>[.<strategy>] (gitignored); a finished run
is not rerun and an audit already written is not redone, so an interrupted sweep continues where it
stopped. Written to bench/results/privacy_audit.{json,md}.

    .venv/bin/python bench/privacy_audit.py [--seeds 0 1 2] [--epsilons 1 4 8] [--max-examples 64]
    .venv/bin/python bench/privacy_audit.py --collect-only   # tables from finished runs and audits
    .venv/bin/python bench/privacy_audit.py model.name=tiny ... --runs /tmp/pa --results /tmp/pa-out
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from fedcollm_quality import provenance, save_results, source_commit  # noqa: E402  (one definition of "which code ran")

from cotune.reporting.metrics import load_run, read_metrics  # noqa: E402
from cotune.reporting.stats import seed_means, summarize  # noqa: E402

NAME = "privacy_audit"
CONFIG = HERE / "configs" / "pq-bbc-topic.yaml"
MAIN = "validation"  # each group's strategy.name; the others come from its run.compare
NO_DP = "none"
GROUPS = {NO_DP: ["local", "fedavg", "prediction"]}  # DP levels: the same without local
DP_COMPARE = ["fedavg", "prediction"]
ATTACKS = ("loss", "calibrated")
FIGURES = ("auc", "tpr_at_1pct_fpr")


def level_name(epsilon: float | None) -> str:
    return NO_DP if epsilon is None else f"eps{epsilon:g}"


def strategies_of(level: str) -> list[str]:
    return [MAIN, *GROUPS.get(level, DP_COMPARE)]


def run_dirs(runs_root: Path, level: str, seed: int) -> dict[str, Path]:
    """The main run (validation trust) and its `run.compare` siblings `<main>.<strategy>`."""
    main = runs_root / level / f"s{seed}"
    return {s: main if s == MAIN else main.with_name(f"{main.name}.{s}") for s in strategies_of(level)}


def finished(d: Path) -> bool:
    """An ended run with test-split perplexities."""
    m = d / "metrics.jsonl"
    text = m.read_text() if m.is_file() else ""
    return '"event":"end"' in text and '"split":"test"' in text


def audited(d: Path) -> bool:
    """An audit written after the run's last record (a rerun run is audited again)."""
    audit, metrics = d / "audit.json", d / "metrics.jsonl"
    return audit.is_file() and metrics.is_file() and audit.stat().st_mtime >= metrics.stat().st_mtime


def cotune(*args: str) -> list[str]:
    """A `cotune` command line on this interpreter, with this checkout's source first on its path."""
    return [sys.executable, "-m", "cotune.cli.main", *args]


def environment() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }


def call(cmd: list[str], what: str) -> float:
    """Run `cmd`; stop the sweep with one error line when it fails; returns its wall seconds."""
    print(f"[run] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    if subprocess.run(cmd, cwd=ROOT, env=environment()).returncode != 0:
        print(
            f"error: {what} failed (its output is above). Fix what it names and rerun this command: "
            "finished runs and audits are kept.",
            file=sys.stderr,
        )
        sys.exit(2)
    return time.perf_counter() - t0


def config_value(overrides: list[str], key: str, default: float) -> float:
    """A numeric setting: from the command's overrides, else the setting config, else `default`."""
    import yaml

    for item in overrides:
        name, sep, value = item.partition("=")
        if sep and name.strip() == key:
            return float(yaml.safe_load(value))
    tree = yaml.safe_load(CONFIG.read_text())
    for part in key.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return float(tree) if isinstance(tree, int | float) else default


def sigma_for(epsilon: float, rounds: int, delta: float) -> float:
    """The noise multiplier whose accounted epsilon after `rounds` full-participation rounds is `epsilon`
    (bisection on the accountant the runs log with; epsilon falls as sigma grows)."""
    from cotune.algorithms.privacy import epsilon_spent

    low, high = 0.05, 200.0
    with warnings.catch_warnings():  # opacus warns at the search's extreme sigmas (its alpha range)
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(60):
            mid = (low + high) / 2
            if epsilon_spent(mid, 1.0, rounds, delta) > epsilon:
                low = mid
            else:
                high = mid
    return high


def clip_norm(runs_root: Path, overrides: list[str]) -> float:
    """C: the median update norm of a fedavg probe run clipped at 1e9 (no noise), measured once."""
    saved = runs_root / "clip_norm.json"
    if saved.is_file():
        return float(json.loads(saved.read_text())["clip_norm"])
    probe = runs_root / "probe"
    if probe.exists():
        shutil.rmtree(probe)
    probe.parent.mkdir(parents=True, exist_ok=True)
    extra = ["strategy.name=fedavg", "run.compare=[]", "run.seed=0", "privacy.clip_norm=1e9"]
    call(cotune("run", str(CONFIG), *overrides, *extra, "--out", str(probe)), "the clip-norm probe run")
    norms = [
        x
        for r in read_metrics(probe / "metrics.jsonl")
        if r.get("type") == "privacy" and r.get("event") == "clip"
        for x in r.get("update_norms") or []
    ]
    if not norms:
        print("error: the probe run logged no update norms", file=sys.stderr)
        sys.exit(2)
    value = round(statistics.median(norms), 6)
    saved.write_text(json.dumps({"clip_norm": value, "probe_updates": len(norms)}) + "\n")
    return value


def dp_overrides(epsilon: float | None, seed: int, runs_root: Path, overrides: list[str]) -> list[str]:
    """The overrides of one DP level: none, or clip_norm C and the sigma of the target epsilon."""
    if epsilon is None:
        return [f"run.compare=[{', '.join(GROUPS[NO_DP])}]"]
    rounds = int(config_value(overrides, "federation.rounds", 1))
    delta = config_value(overrides, "privacy.delta", 1e-5)
    sigma = sigma_for(epsilon, rounds, delta)
    return [
        f"run.compare=[{', '.join(DP_COMPARE)}]",
        f"privacy.clip_norm={clip_norm(runs_root, overrides)}",
        f"privacy.noise_multiplier={sigma:.6f}",
        f"privacy.seed={seed}",
    ]


def sweep(
    levels: list[float | None], seeds: list[int], runs_root: Path, overrides: list[str], max_examples: int
) -> dict[str, float]:
    """Run and audit every (level, seed) not done yet; returns the wall seconds of each step made."""
    timings: dict[str, float] = {}
    for seed in seeds:  # seed-major: a sweep cut short still has every level for the first seeds
        for epsilon in levels:
            level = level_name(epsilon)
            dirs = run_dirs(runs_root, level, seed)
            if not all(finished(d) for d in dirs.values()):
                for d in dirs.values():  # a half-finished group starts again from scratch
                    if d.exists():
                        shutil.rmtree(d)
                dirs[MAIN].parent.mkdir(parents=True, exist_ok=True)
                (runs_root / level / f"s{seed}.commit").write_text(source_commit() + "\n")
                extra = [f"strategy.name={MAIN}", f"run.seed={seed}"]
                extra += dp_overrides(epsilon, seed, runs_root, overrides)
                cmd = cotune("run", str(CONFIG), *overrides, *extra, "--out", str(dirs[MAIN]))
                timings[f"{level}/s{seed}/run"] = call(cmd, f"the run of {level} seed {seed}")
            for strategy, d in dirs.items():
                if not audited(d):
                    cmd = cotune("audit", str(d), "--max-examples", str(max_examples))
                    timings[f"{level}/s{seed}/{strategy}/audit"] = call(cmd, f"the audit of {d}")
    return timings


def seed_row(d: Path) -> dict:
    """One run's client-mean figures: test perplexity, epsilon spent, each attack's AUC and TPR."""
    run = load_run(d)
    audit = json.loads((d / "audit.json").read_text())
    ppl = run.final_ppl()
    row = {
        "test_ppl": statistics.fmean(ppl.values()) if ppl else None,
        "epsilon": None if run.privacy is None else run.privacy.epsilon,
        "clients": len(audit["clients"]),
        "members_per_client": min(c["members"] for c in audit["clients"]),
    }
    for attack in ATTACKS:
        for figure in FIGURES:
            row[f"{attack}_{figure}"] = statistics.fmean(c[attack][figure] for c in audit["clients"])
    return row


def collect(levels: list[float | None], seeds: list[int], runs_root: Path) -> dict:
    """Per (level, strategy): per-seed rows and their summaries over seeds."""
    out: dict = {"levels": {}}
    for epsilon in levels:
        level = level_name(epsilon)
        complete = [
            s
            for s in seeds
            if all(finished(d) and audited(d) for d in run_dirs(runs_root, level, s).values())
        ]
        per_strategy: dict = {}
        for strategy in strategies_of(level):
            rows = {s: seed_row(run_dirs(runs_root, level, s)[strategy]) for s in complete}
            summary = {}
            for key in [k for k in (rows[complete[0]] if complete else {}) if k != "clients"]:
                values = {s: {0: r[key]} for s, r in rows.items() if r[key] is not None}
                means = seed_means(values)
                summary[key] = summary_dict(summarize([means[s] for s in sorted(means)])) if means else None
            per_strategy[strategy] = {"per_seed": {str(s): r for s, r in rows.items()}, "summary": summary}
        out["levels"][level] = {"target_epsilon": epsilon, "seeds": complete, "strategies": per_strategy}
    saved = runs_root / "clip_norm.json"
    out["clip_norm"] = json.loads(saved.read_text()) if saved.is_file() else None
    return out


def summary_dict(s) -> dict:
    return {"n": s.n, "mean": s.mean, "se": s.se, "low": s.low, "high": s.high, "confidence": s.confidence}


def cell(summary: dict | None, digits: int = 3) -> str:
    if not summary:
        return "–"
    se = "" if summary["se"] is None else f" ± {summary['se']:.{digits}f}"
    return f"{summary['mean']:.{digits}f}{se}"


def markdown(result: dict) -> str:
    lines = [
        "# Privacy audit: membership inference on each client's released adapter",
        "",
        f"Commit {result['commit']}, {result['machine']}; command `{result['command']}`.",
        "Each figure: the clients of a seed averaged, then mean ± s.e. over seeds. AUC 0.5: the attack does "
        "no better than chance; TPR at 1% FPR: members caught while flagging at most 1% of non-members.",
        "",
        "| DP | strategy | ε spent | test ppl | loss AUC | loss TPR@1%FPR | calibrated AUC "
        "| calibrated TPR@1%FPR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level, body in result["levels"].items():
        for strategy, data in body["strategies"].items():
            s = data["summary"]
            if not s:
                continue
            lines.append(
                f"| {level} | {strategy} | {cell(s.get('epsilon'), 2)} | {cell(s.get('test_ppl'), 2)} | "
                f"{cell(s.get('loss_auc'))} | {cell(s.get('loss_tpr_at_1pct_fpr'))} | "
                f"{cell(s.get('calibrated_auc'))} | {cell(s.get('calibrated_tpr_at_1pct_fpr'))} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 4.0, 8.0])
    ap.add_argument("--max-examples", type=int, default=64, help="members (and non-members) per client")
    ap.add_argument(
        "--runs", type=Path, default=ROOT / "runs" / "bench" / "privacy", help="run directories' root"
    )
    ap.add_argument("--results", type=Path, default=HERE / "results", help="where the .json and .md go")
    ap.add_argument("--collect-only", action="store_true", help="tabulate finished runs, run nothing")
    ap.add_argument(
        "overrides", nargs="*", help="dotted overrides for every run (smoke tests: model.name=tiny)"
    )
    args = ap.parse_intermixed_args()

    levels: list[float | None] = [None, *args.epsilons]
    t0 = time.perf_counter()
    timings = (
        {} if args.collect_only else sweep(levels, args.seeds, args.runs, args.overrides, args.max_examples)
    )
    result = collect(levels, args.seeds, args.runs)
    result.update(
        **provenance("privacy_audit.py"),
        invocation_seconds=time.perf_counter() - t0,
        timings=timings,
    )
    save_results(args.results, NAME, result, markdown(result))


if __name__ == "__main__":
    main()
