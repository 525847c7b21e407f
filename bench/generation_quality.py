"""Personalized fine-tuning on generation data: validation trust against local, fedavg and prediction trust.

For every setting config in bench/configs/gq-*.yaml (docstrings: python functions -> the first line of
their docstring, one client per standard-library package; headlines: BBC article -> its title, one
client per topic) and every seed, one `cotune run` (one model load) trains the clients with validation
trust, the pre-declared method, and through `run.compare` local, fedavg and prediction trust on
identical data and initialisation. Run directories go to runs/bench/gq/<setting>/s<seed>[.<strategy>]
(gitignored); a finished seed is not rerun, so an interrupted sweep continues where it stopped (a seed
cut short starts again from scratch). The commit each seed ran on is written beside its directories.

Collected, per strategy: each client's test ROUGE-L and response perplexity (the reference response's
perplexity, response tokens only) at the final round, averaged over the clients of a seed
(clients are nested in their seed: `reporting.stats.seed_means`), then over seeds (mean, standard error,
t interval on n_seeds - 1 df: `summarize`); and validation trust minus each baseline paired by seed
(`paired_difference`) with its verdict ("not significant" when the 95% interval covers 0). No best-of is
chosen on test: the claim is about validation trust only. Written to
bench/results/generation_quality.{json,md}.

    .venv/bin/python bench/generation_quality.py [--seeds 0 1 2] [--settings docstrings headlines]
    .venv/bin/python bench/generation_quality.py --collect-only   # tables from finished runs
    .venv/bin/python bench/generation_quality.py model.name=tiny ... --runs /tmp/gq --results /tmp/gq-out
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from fedcollm_quality import provenance, save_results, source_commit  # noqa: E402  (one definition of "which code ran")

from cotune.reporting.metrics import load_run  # noqa: E402
from cotune.reporting.stats import Summary, paired_difference, seed_means, summarize  # noqa: E402

SETTINGS = ["docstrings", "headlines"]
MAIN = "validation"  # the pre-declared method: the configs' strategy.name
BASELINES = ["local", "fedavg", "prediction"]  # the configs' run.compare
STRATEGIES = [MAIN, *BASELINES]
# metric -> (what it is, True when higher is better)
METRICS = {"rouge_l": ("test ROUGE-L", True), "ppl": ("test response perplexity", False)}
NAME = "generation_quality"


def run_dirs(runs_root: Path, setting: str, seed: int) -> dict[str, Path]:
    """The main run (validation trust) and its `run.compare` siblings `<main>.<strategy>`."""
    main = runs_root / setting / f"s{seed}"
    return {s: main if s == MAIN else main.with_name(f"{main.name}.{s}") for s in STRATEGIES}


def commit_file(runs_root: Path, setting: str, seed: int) -> Path:
    return runs_root / setting / f"s{seed}.commit"


def finished(d: Path) -> bool:
    """An ended run that logged test generations."""
    m = d / "metrics.jsonl"
    text = m.read_text() if m.is_file() else ""
    return '"event":"end"' in text and '"type":"gen"' in text and '"split":"test"' in text


def sweep(settings: list[str], seeds: list[int], runs_root: Path, overrides: list[str]) -> dict[str, float]:
    """Run every (setting, seed) not finished yet; returns the wall seconds of each run made."""
    timings = {}
    for seed in seeds:  # seed-major: a sweep cut short still has every setting for the first seeds
        for setting in settings:
            dirs = run_dirs(runs_root, setting, seed)
            if all(finished(d) for d in dirs.values()):
                print(f"[skip] {setting} seed {seed}: finished", flush=True)
                continue
            for d in dirs.values():  # a half-finished seed starts again from scratch
                if d.exists():
                    shutil.rmtree(d)
            dirs[MAIN].parent.mkdir(parents=True, exist_ok=True)
            commit_file(runs_root, setting, seed).write_text(source_commit() + "\n")
            timings[f"{setting}/s{seed}"] = run_one(setting, seed, overrides, dirs[MAIN])
    return timings


def run_one(setting: str, seed: int, overrides: list[str], out: Path) -> float:
    """One `cotune run` of a setting's config (all four strategies); returns its wall seconds."""
    cmd = [
        sys.executable,  # this interpreter, with this checkout's source first on its path
        "-m",
        "cotune.cli.main",
        "run",
        str(HERE / "configs" / f"gq-{setting}.yaml"),
        f"run.seed={seed}",
        *overrides,
        "--out",
        str(out),
    ]
    print(f"[run] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
        print(
            f"error: the run of setting {setting} seed {seed} failed (its output is above; run directory "
            f"{out}). Fix what it names and rerun this command: finished seeds are kept.",
            file=sys.stderr,
        )
        sys.exit(2)
    seconds = time.perf_counter() - t0
    print(f"[done] {setting} seed {seed} in {seconds:.0f} s", flush=True)
    return seconds


def final_per_client(d: Path) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]], dict]:
    """(metric -> client -> value at the final generation round, the same at round 0, the run's config)."""
    run = load_run(d)
    by_round = run.gen_series().get(None, {})
    last = run.final_gen_round()
    if last is None or run.gen_split() != "test":
        raise ValueError(f"{d}: no test generations logged")

    def at(rnd: int) -> dict[str, dict[int, float]]:
        recs = [r for r in by_round.get(rnd, []) if r.client is not None]
        return {m: {r.client: float(getattr(r, m)) for r in recs if r.client is not None} for m in METRICS}

    return at(last), at(0), run.config


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else ""


def collect(settings: list[str], seeds: list[int], runs_root: Path) -> dict:
    """Per setting: per-seed client values, seed means, summaries over seeds, paired differences."""
    out: dict = {"settings": {}}
    for setting in settings:
        # a seed counts once every strategy finished it: the strategies compare on the same seeds
        complete = [s for s in seeds if all(finished(d) for d in run_dirs(runs_root, setting, s).values())]
        per_client: dict[str, dict[str, dict[int, dict[int, float]]]] = {}  # strategy -> metric -> seed -> ..
        before: dict[str, dict[int, dict[int, float]]] = {m: {} for m in METRICS}  # round 0 (same for all)
        provenance: dict[str, dict] = {}
        budget = None
        for seed in complete:
            commit = commit_file(runs_root, setting, seed)
            runs = {}
            for s, d in run_dirs(runs_root, setting, seed).items():
                final, zero, config = final_per_client(d)
                for m in METRICS:
                    per_client.setdefault(s, {}).setdefault(m, {})[seed] = final[m]
                    if s == MAIN:
                        before[m][seed] = zero[m]
                budget = budget or budget_of(config)
                runs[s] = {
                    "dir": str(d.relative_to(runs_root)),
                    "config_sha256": digest(d / "config.yaml"),
                    "metrics_sha256": digest(d / "metrics.jsonl"),
                }
            provenance[str(seed)] = {
                "commit": commit.read_text().strip() if commit.is_file() else "not recorded",
                "runs": runs,
            }
        out["settings"][setting] = {
            "seeds": complete,
            "budget": budget,
            "provenance": provenance,
            "strategies": {s: tabulate(per_client.get(s, {})) for s in STRATEGIES},
            "before_training": tabulate(before) if complete else {},
            "paired": paired(per_client) if complete else {},
        }
    return out


def tabulate(by_metric: dict[str, dict[int, dict[int, float]]]) -> dict:
    """metric -> per-client values by seed, seed means, and their summary over seeds."""
    table = {}
    for m, per_seed in by_metric.items():
        if not per_seed:
            continue
        means = seed_means(per_seed)
        table[m] = {
            "per_client": {str(s): {str(c): v for c, v in pc.items()} for s, pc in per_seed.items()},
            "seed_means": {str(s): v for s, v in means.items()},
            "summary": summary_dict(summarize([means[s] for s in sorted(means)])),
        }
    return table


def paired(per_client: dict[str, dict[str, dict[int, dict[int, float]]]]) -> dict:
    """metric -> baseline -> validation trust minus the baseline, per seed, with its interval and verdict."""
    out: dict = {}
    for m, (_, higher_better) in METRICS.items():
        main = seed_means(per_client[MAIN][m])
        for b in BASELINES:
            p = paired_difference(main, seed_means(per_client[b][m]))
            better = None
            if p.summary.significant:
                better = MAIN if (p.summary.mean > 0) == higher_better else b
            out.setdefault(m, {})[b] = {
                "by_seed": {str(s): v for s, v in p.by_seed.items()},
                "summary": summary_dict(p.summary),
                "verdict": p.summary.verdict(),
                "better": better,
            }
    return out


def summary_dict(s: Summary) -> dict:
    return {"n": s.n, "mean": s.mean, "se": s.se, "low": s.low, "high": s.high, "confidence": s.confidence}


def budget_of(cfg: dict) -> dict:
    fed, data, train = cfg.get("federation", {}), cfg.get("data", {}), cfg.get("train", {})
    return {
        "model": (cfg.get("model") or {}).get("name"),
        "clients": fed.get("clients"),
        "warmup_steps": fed.get("warmup_steps"),
        "rounds": fed.get("rounds"),
        "local_steps": fed.get("local_steps"),
        "batch_size": train.get("batch_size"),
        "lr": train.get("lr"),
        "seq_len": data.get("seq_len"),
        "max_chars": data.get("max_chars"),
        "max_new_tokens": data.get("max_new_tokens"),
        "max_train_windows": data.get("max_train_windows"),
        "max_val_windows": data.get("max_val_windows"),
        "max_test_windows": data.get("max_test_windows"),
        "public_windows": data.get("public_windows"),
        "lora_r": (cfg.get("lora") or {}).get("r"),
        "threads": (cfg.get("run") or {}).get("threads"),
    }


# ---------------------------------------------------------------------------------------------- markdown


def scale_of(metric: str) -> float:
    return 100.0 if metric == "rouge_l" else 1.0  # ROUGE-L shown in points (x100)


def level(summary: dict, scale: float) -> str:
    """A mean over seeds: 'mean ± se (95% CI low to high)', or the mean alone for one seed."""
    mean = f"{summary['mean'] * scale:.2f}"
    if summary["se"] is None:
        return mean
    return (
        f"{mean} ± {summary['se'] * scale:.2f} "
        f"(95% CI {summary['low'] * scale:.2f} to {summary['high'] * scale:.2f})"
    )


def per_seed(values: dict[str, float], scale: float) -> str:
    return ", ".join(f"{v * scale:.2f}" for _, v in sorted(values.items(), key=lambda kv: int(kv[0])))


def markdown(result: dict) -> str:
    lines = [
        f"Personalized fine-tuning on generation data, validation trust (pre-declared) vs local, fedavg and "
        f"prediction trust ({result['machine']}; torch {result['torch']}; collected at {result['commit']})",
        "",
        f"Command: `{result['command']}`",
        "",
        "Each client's **test** examples (never trained on, never seen by any trust evidence), greedy "
        "decoding; ROUGE-L in points (x100, higher is better) and the reference response's perplexity "
        "(response tokens only, lower is better) at the final round. Clients are averaged within their "
        "seed; the table gives the mean over seeds ± its standard error and the 95% t interval "
        "(n_seeds - 1 df). The paired rows are validation trust minus the baseline, per seed; "
        "'not significant' when the interval covers 0. "
        "Validation trust was chosen before the runs; no strategy is picked on test.",
        "",
    ]
    for setting, body in result["settings"].items():
        lines += [f"### {setting}", ""]
        if not body["seeds"]:
            lines += ["no finished seed yet", ""]
            continue
        b = body["budget"] or {}
        lines += [
            f"{b.get('model')}, {b.get('clients')} clients, seeds {body['seeds']}; "
            f"{b.get('warmup_steps')} warmup + {b.get('rounds')} rounds × {b.get('local_steps')} local "
            f"steps, batch {b.get('batch_size')}, lr {b.get('lr')}, LoRA r {b.get('lora_r')}; "
            f"≤{b.get('max_train_windows')} train / "
            f"{b.get('max_val_windows')} val / {b.get('max_test_windows')} test examples per client, "
            f"{b.get('public_windows')} public; prompts ≤{b.get('max_chars')} characters, seq_len "
            f"{b.get('seq_len')}, ≤{b.get('max_new_tokens')} new tokens.",
            "",
            "| strategy | test ROUGE-L | per seed | response ppl | per seed |",
            "|---|---|---|---|---|",
        ]
        rows = [
            *((s, body["strategies"][s]) for s in STRATEGIES),
            ("before training", body["before_training"]),
        ]
        for name, t in rows:
            cells = []
            for m in METRICS:
                sc = scale_of(m)
                cells += [level(t[m]["summary"], sc), per_seed(t[m]["seed_means"], sc)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "| validation − | ROUGE-L difference | per seed | verdict "
            "| ppl difference | per seed | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for base in BASELINES:
            cells = []
            for m in METRICS:
                p = body["paired"][m][base]
                s = p["summary"]
                diff = Summary(s["n"], s["mean"], s["se"], s["low"], s["high"], s["confidence"])
                verdict = p["verdict"] + (f" ({p['better']} better)" if p["better"] else "")
                cells += [diff.text(2, scale_of(m)), per_seed(p["by_seed"], scale_of(m)), verdict]
            lines.append(f"| {base} | " + " | ".join(cells) + " |")
        commits = "; ".join(f"seed {s}: {p['commit']}" for s, p in body["provenance"].items())
        lines += ["", f"Commit each seed ran on: {commits}.", ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


def run_seconds(previous: Path, timings: dict[str, float], result: dict) -> dict[str, float]:
    """Wall seconds of each (setting, seed) in the table: this invocation's runs, and those an earlier
    invocation (a sweep continued, --collect-only) recorded for the seeds it keeps."""
    old = json.loads(previous.read_text()).get("run_seconds", {}) if previous.is_file() else {}
    kept = {f"{name}/s{seed}" for name, body in result["settings"].items() for seed in body["seeds"]}
    return {k: v for k, v in {**old, **timings}.items() if k in kept}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench" / "gq", help="run directories' root")
    ap.add_argument("--results", type=Path, default=HERE / "results", help="where the .json and .md go")
    ap.add_argument("--collect-only", action="store_true", help="tabulate finished runs, run nothing")
    ap.add_argument(
        "overrides", nargs="*", help="dotted overrides for every run (smoke tests: model.name=tiny)"
    )
    args = ap.parse_intermixed_args()

    t0 = time.perf_counter()
    timings = {} if args.collect_only else sweep(args.settings, args.seeds, args.runs, args.overrides)
    result = collect(args.settings, args.seeds, args.runs)
    result.update(
        **provenance("generation_quality.py"),
        invocation_seconds=time.perf_counter() - t0,
        run_seconds=run_seconds(args.results / f"{NAME}.json", timings, result),
    )
    save_results(args.results, NAME, result, markdown(result))


if __name__ == "__main__":
    main()
