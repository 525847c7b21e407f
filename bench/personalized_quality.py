"""Personalized collaborative fine-tuning quality: ten strategies x heterogeneous settings x seeds.

For every setting config in bench/configs/pq-*.yaml and every seed, one `cotune run` (one model
load) trains the same clients with validation trust and, through `run.compare`, local, fedavg,
weight and prediction trust on identical data and initialisation; the federated LoRA baselines
(ffa_lora, fedsa_lora, hetlora, flexlora, flora) run alone on the same data and seed. Run directories go to
runs/bench/pq/<setting>/s<seed>[.<strategy>] (gitignored); a finished run is not rerun, so an
interrupted sweep continues where it stopped. `--ranks 4 8 16 32` gives the clients those LoRA ranks
(local, hetlora, flexlora, flora, validation and prediction trust; runs/bench/pq-ranks, results
personalized_quality_ranks.*) and the table adds each client's bytes sent per round. Then the final
per-client test perplexities (each client's held-out documents, unseen by training and by every
trust) and validation perplexities are collected into bench/results/personalized_quality.{json,md}
and one per-round plot per setting.

    .venv/bin/python bench/personalized_quality.py [--seeds 0 1 2] [--settings bbc-topic ...]
    .venv/bin/python bench/personalized_quality.py --collect-only    # tables/plots from finished runs
    .venv/bin/python bench/personalized_quality.py --from-results    # statistics again from the JSON alone
    .venv/bin/python bench/personalized_quality.py --ranks 4 8 16 32 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

from cotune.reporting.stats import Summary, paired_difference, seed_means, summarize  # noqa: E402

SETTINGS = ["bbc-topic", "bbc-mixed", "wiki-lang", "code-prose"]
GROUP = ["local", "fedavg", "weight", "validation", "prediction"]  # one `cotune run` (run.compare)
MAIN = "validation"  # the config's strategy.name; the rest of GROUP comes from its run.compare
# The federated LoRA baselines of issue 16, each its own run on the same data and initialisation.
SINGLES = ["ffa_lora", "fedsa_lora", "hetlora", "flexlora", "flora"]
STRATEGIES = GROUP + SINGLES
# The claim this table tests, declared before the runs (issue 31): validation trust against each other
# strategy, paired by seed. No strategy is chosen on the test split.
DECLARED = "validation"
DECLARED_BASELINES = ("local", "fedavg")  # the claim's baselines; every other pair is exploratory
# --ranks: clients of different LoRA ranks (one per client); only these strategies accept them.
RANK_STRATEGIES = ["local", "hetlora", "flexlora", "flora", "validation", "prediction"]


def run_dirs(runs_root: Path, setting: str, seed: int, strategies: list[str] = STRATEGIES) -> dict[str, Path]:
    main = runs_root / setting / f"s{seed}"
    return {s: (main if s == MAIN else main.with_name(f"{main.name}.{s}")) for s in strategies}


def finished(d: Path) -> bool:
    """An ended run with test-split records (runs from before per-client test splits are rerun)."""
    m = d / "metrics.jsonl"
    text = m.read_text() if m.is_file() else ""
    return '"event":"end"' in text and '"split":"test"' in text


def final_val_ppl(d: Path, final_round: int | None) -> dict[int, float]:
    """Client -> validation perplexity at the run's final round: what validation trust chose on."""
    from cotune.reporting.metrics import read_metrics

    return {
        m["client"]: m["ppl"]
        for m in read_metrics(d / "metrics.jsonl")
        if m.get("type") == "eval" and m.get("split") == "val" and m.get("round") == final_round
    }


def sweep(
    settings: list[str],
    seeds: list[int],
    runs_root: Path,
    overrides: list[str],
    strategies: list[str],
    grouped: bool = True,
) -> dict:
    """Run what is missing. With `grouped` (clients of one rank), the trust group's strategies asked for run
    as one `cotune run` (run.compare: one model load, identical data and initialisation); the rest alone."""
    timings = {}
    for seed in seeds:  # seed-major: a sweep cut short still has every setting for the first seeds
        for setting in settings:
            dirs = run_dirs(runs_root, setting, seed, strategies)
            todo = [s for s in strategies if not finished(dirs[s])]
            if not todo:
                print(f"[skip] {setting} seed {seed}: finished", flush=True)
                continue
            # the GROUP strategies asked for run as one `cotune run` (uniform ranks; its compare list cut to
            # them when a subset is asked for); every other strategy (and every run with --ranks) alone
            group = [s for s in GROUP if s in strategies] if grouped and MAIN in strategies else []
            compare = [] if group == GROUP else [f"run.compare=[{','.join(s for s in group if s != MAIN)}]"]
            runs = ([("group", group)] if any(s in todo for s in group) else []) + [
                (s, [s]) for s in todo if s not in group
            ]
            for name, members in runs:
                for s in members:  # a half-finished run starts again from scratch
                    if dirs[s].exists():
                        subprocess.run(["rm", "-rf", str(dirs[s])], check=True)
                alone = compare if name == "group" else [f"strategy.name={name}", "run.compare=[]"]
                out = dirs[MAIN] if name == "group" else dirs[name]
                timings[f"{setting}/s{seed}/{name}"] = run_one(setting, seed, [*alone, *overrides], out)
    return timings


def sweep_by_name(
    name: str,
    settings: list[str],
    strategies: list[str],
    seeds: list[int],
    runs: Path,
    overrides: list[str],
    collect_only: bool = False,
) -> dict:
    """A sweep of this script run for another bench script (its own run directories and results file,
    resumable like any): the results it wrote."""
    cmd = [sys.executable, str(HERE / "personalized_quality.py"), "--settings", *settings]
    cmd += ["--strategies", *strategies, "--seeds", *map(str, seeds), "--name", name, "--runs", str(runs)]
    cmd += ["--collect-only"] if collect_only else []
    cmd += overrides
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((HERE / "results" / f"{name}.json").read_text())


def run_one(setting: str, seed: int, overrides: list[str], out: Path) -> float:
    """One `cotune run` of a setting's config; returns its wall seconds."""
    cmd = [
        sys.executable,  # this interpreter, with this checkout's source first on its path
        "-m",
        "cotune.cli.main",
        "run",
        str(HERE / "configs" / f"pq-{setting}.yaml"),
        f"run.seed={seed}",
        *overrides,
        "--out",
        str(out),
    ]
    print(f"[run] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - t0
    print(f"[done] {setting} seed {seed} -> {out.name} in {seconds:.0f} s", flush=True)
    return seconds


def _stats(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_dict(s: Summary) -> dict:
    return {"n": s.n, "mean": s.mean, "se": s.se, "low": s.low, "high": s.high, "confidence": s.confidence}


def seed_statistics(strategies: dict[str, dict]) -> None:
    """Add to each strategy's entry the statistics over seeds (clients averaged within their seed first:
    they share the seed's partition and initialisation, so they are not independent samples): the seed
    means, their summary (mean, standard error, 95% t interval on n_seeds - 1 df), the seeds on which it
    beat local / fedavg, and for the declared method the difference to every other strategy paired by
    seed, with its verdict. Works from the per-(seed, client) perplexities alone, so a results file
    written before these statistics existed is re-rendered without its runs (`--from-results`)."""
    means = {
        s: seed_means({int(k): {int(c): p for c, p in pc.items()} for k, pc in r["final_ppl"].items()})
        for s, r in strategies.items()
        if r["final_ppl"]
    }
    for s, r in strategies.items():
        m = means.get(s)
        r["seed_means"] = {str(k): v for k, v in sorted(m.items())} if m else {}
        r["summary"] = summary_dict(summarize([m[k] for k in sorted(m)])) if m else None
        r["seeds_won"] = {
            ref: [sum(m[k] < means[ref][k] for k in set(m) & set(means[ref])), len(set(m) & set(means[ref]))]
            for ref in ("local", "fedavg")
            if m and ref in means and ref != s
        }
        r.pop("wins", None)  # (seed, client) pairs counted as independent: replaced by seeds_won
        r.pop("std_over_clients_and_seeds", None)
        r.pop("std_of_seed_means", None)
    if DECLARED not in means:
        return
    paired = {}
    for other in [s for s in strategies if s != DECLARED and s in means]:
        p = paired_difference(means[DECLARED], means[other])
        paired[other] = {
            "by_seed": {str(k): v for k, v in p.by_seed.items()},
            "summary": summary_dict(p.summary),
            "verdict": p.summary.verdict(),
        }
    strategies[DECLARED]["paired"] = paired


def collect(settings: list[str], seeds: list[int], runs_root: Path, strategies: list[str]) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from cotune.reporting.metrics import load_run

    out: dict = {"settings": {}}
    for setting in settings:
        per: dict[str, dict] = {}
        budget = None
        # a seed counts once every strategy finished it: the strategies compare on the same seeds
        complete = [
            seed
            for seed in seeds
            if all(finished(d) for d in run_dirs(runs_root, setting, seed, strategies).values())
        ]
        for s in strategies:
            final: dict[int, dict[int, float]] = {}  # seed -> client -> test ppl
            final_val: dict[int, dict[int, float]] = {}  # seed -> client -> validation ppl
            curves: dict[int, list[tuple[int, float]]] = {}
            round_wall: list[float] = []
            up: dict[int, list[float]] = {}  # client -> bytes it sent per round (runs that log traffic)
            down: dict[int, list[float]] = {}  # client -> bytes it received per round
            for seed in complete:
                d = run_dirs(runs_root, setting, seed, strategies)[s]
                run = load_run(d)
                assert run.ppl_split == "test", f"{d} has no test split"
                final[seed] = run.final_ppl()
                final_val[seed] = final_val_ppl(d, run.final_round())
                curves[seed] = run.mean_ppl_curve()
                if budget is None:
                    budget = _budget(run.config)
                from cotune.reporting.metrics import read_metrics

                records = read_metrics(d / "metrics.jsonl")
                round_wall += [m["wall_s"] for m in records if m.get("type") == "round"]
                for m in records:
                    if m.get("type") == "comm":
                        up.setdefault(m["client"], []).append(m["bytes_up"])
                        down.setdefault(m["client"], []).append(m["bytes_down"])
            values = [p for per_client in final.values() for p in per_client.values()]
            val_values = [p for per_client in final_val.values() for p in per_client.values()]
            per[s] = {
                "final_ppl": {str(k): {str(c): p for c, p in v.items()} for k, v in final.items()},
                "final_val_ppl": {str(k): {str(c): p for c, p in v.items()} for k, v in final_val.items()},
                "mean": _stats(values)[0],
                "val_mean": _stats(val_values)[0],
                "seeds": sorted(final),
                "curves": {str(k): v for k, v in curves.items()},
                "mean_round_wall_s": statistics.fmean(round_wall) if round_wall else None,
                "bytes_up_per_round": {str(c): statistics.fmean(v) for c, v in sorted(up.items())},
                "bytes_down_per_round": {str(c): statistics.fmean(v) for c, v in sorted(down.items())},
            }
        seed_statistics(per)
        out["settings"][setting] = {"strategies": per, "budget": budget}
    return out


def _budget(cfg: dict) -> dict:
    fed, data, train = cfg.get("federation", {}), cfg.get("data", {}), cfg.get("train", {})
    return {
        "clients": fed.get("clients"),
        "warmup_steps": fed.get("warmup_steps"),
        "rounds": fed.get("rounds"),
        "local_steps": fed.get("local_steps"),
        "seq_len": data.get("seq_len"),
        "batch_size": train.get("batch_size"),
        "max_train_windows": data.get("max_train_windows"),
        "max_val_windows": data.get("max_val_windows"),
        "test_fraction": data.get("test_fraction"),
        "max_test_windows": data.get("max_test_windows"),
        "public_windows": data.get("public_windows"),
        "lr": train.get("lr"),
        "lora": cfg.get("lora"),
        "rank": (cfg.get("lora") or {}).get("r"),
        "ranks": (cfg.get("lora") or {}).get("ranks"),
    }


def human(n: float) -> str:
    """Decimal kB / MB, three significant digits."""
    return f"{n / 1e6:.3g} MB" if n >= 1e6 else f"{n / 1e3:.3g} kB"


def plot(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for setting, body in result["settings"].items():
        if not any(r["seeds"] for r in body["strategies"].values()):
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
        for s, r in body["strategies"].items():
            curves = list(r["curves"].values())
            if not curves:
                continue
            rounds = sorted({rnd for c in curves for rnd, _ in c})
            means, stds = [], []
            for rnd in rounds:
                vals = [v for c in curves for rr, v in c if rr == rnd]
                m, sd = _stats(vals)
                means.append(m)
                stds.append(sd)
            ax.plot(rounds, means, marker="o", label=s)
            ax.fill_between(
                rounds,
                [m - d for m, d in zip(means, stds, strict=True)],
                [m + d for m, d in zip(means, stds, strict=True)],
                alpha=0.12,
            )
        ax.set_xlabel("round (0 = before training; round 1 includes the warmup steps)")
        ax.set_ylabel("mean test perplexity over clients")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"{setting}: mean over seeds (band: ±1 sample std over seeds)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"{result['name']}_{setting}.png"
        fig.savefig(out_dir / name)
        plt.close(fig)
        files.append(name)
    return files


def as_summary(d: dict) -> Summary:
    return Summary(d["n"], d["mean"], d["se"], d["low"], d["high"], d["confidence"])


def level(d: dict | None) -> str:
    """'mean ± se (95% CI low to high)' of a level (not a difference: no sign)."""
    if d is None:
        return "-"
    s = as_summary(d)
    if s.se is None or s.low is None or s.high is None:
        return f"{s.mean:.2f}"
    return f"{s.mean:.2f} ± {s.se:.2f} ({round(100 * s.confidence)}% CI {s.low:.2f} to {s.high:.2f})"


def per_seed(values: dict[str, float]) -> str:
    return ", ".join(f"{v:.2f}" for _, v in sorted(values.items(), key=lambda kv: int(kv[0])))


def markdown(result: dict) -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from cotune.config.names import strategy_spec

    lines = [
        f"Personalized collaborative fine-tuning, SmolLM2-135M-Instruct + LoRA ({result['machine']})",
        "",
        "Final per-client **test** perplexity (each client's held-out documents: no training step and no "
        "trust evidence saw them). Clients are averaged within their seed (they share its partition and "
        "initialisation: not independent samples); `test ppl` is the mean over seeds ± its standard error "
        "and the 95% t interval (n_seeds - 1 df); `seeds won` counts the seeds whose client mean is lower "
        "than local's / fedavg's. Lower is better. The claim tested was declared before the runs: "
        f"**{DECLARED} trust against {' and '.join(DECLARED_BASELINES)}**, paired by seed (second table; "
        "'not significant' when the interval covers 0); its rows against the other strategies are "
        "exploratory (each interval at 95%, no correction for multiple comparisons). No strategy is "
        "chosen on the test split. `val ppl` is the mean on "
        "the validation windows, which validation trust chose its weights on: its lead there is measured on "
        "data it used.",
        "",
    ]
    for setting, body in result["settings"].items():
        if not any(r["seeds"] for r in body["strategies"].values()):
            lines += [f"### {setting}", "", "no finished run yet", ""]
            continue
        b = body["budget"] or {}
        seeds = sorted({s for r in body["strategies"].values() for s in r["seeds"]})
        lines += [
            f"### {setting}",
            "",
            f"{b.get('clients')} clients, seeds {seeds}; {b.get('warmup_steps')} warmup + "
            f"{b.get('rounds')} rounds × {b.get('local_steps')} local steps, batch {b.get('batch_size')} × "
            f"{b.get('seq_len')} tokens, "
            f"≤{b.get('max_train_windows')} train / {b.get('max_val_windows')} val / "
            f"{b.get('max_test_windows')} test windows per client, "
            f"{b.get('public_windows')} public windows, lr {b.get('lr')}",
            "",
            f"LoRA ranks of the clients: {b.get('ranks')}"
            if b.get("ranks")
            else f"LoRA rank {b.get('rank')}",
            "",
            "| strategy | test ppl (mean over seeds ± s.e., 95% CI) | per seed | seeds won vs local "
            "| vs fedavg | val ppl | mean round wall | up / round, per client |",
            "|---|---|---|---:|---:|---:|---:|---|",
        ]
        for s, r in body["strategies"].items():
            if not r["seeds"]:
                lines.append(f"| {s} | not run | | | | | | |")
                continue
            won = {ref: f"{w[0]}/{w[1]}" for ref, w in r["seeds_won"].items()}
            wall = f"{r['mean_round_wall_s']:.1f} s" if r["mean_round_wall_s"] else "-"
            traffic = " / ".join(human(x) for x in r["bytes_up_per_round"].values()) or "-"
            if not strategy_spec(s).exchanges:  # local: runs before the fix logged its in-memory copies
                traffic = "0 (nothing travels)"
            lines.append(
                f"| {s} | {level(r['summary'])} | {per_seed(r['seed_means'])} | {won.get('local', '-')} "
                f"| {won.get('fedavg', '-')} | {r['val_mean']:.2f} | {wall} | {traffic} |"
            )
        paired = body["strategies"].get(DECLARED, {}).get("paired", {})
        if paired:
            lines += [
                "",
                f"| {DECLARED} − | test ppl difference (mean ± s.e., 95% CI) | per seed | verdict |",
                "|---|---|---|---|",
            ]
            order = [o for o in DECLARED_BASELINES if o in paired] + [
                o for o in paired if o not in DECLARED_BASELINES
            ]
            for other in order:
                p = paired[other]
                verdict = p["verdict"]
                if verdict == "significant":
                    verdict += f" ({DECLARED if p['summary']['mean'] < 0 else other} better)"
                if other not in DECLARED_BASELINES:
                    verdict += ", exploratory"
                lines.append(
                    f"| {other} | {as_summary(p['summary']).text(2)} | {per_seed(p['by_seed'])} | {verdict} |"
                )
        lines += ["", f"![{setting}]({result['name']}_{setting}.png)", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", nargs="+", default=SETTINGS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, help="default: runs/bench/pq (with --ranks: runs/bench/pq-ranks)")
    ap.add_argument(
        "--ranks", nargs="+", type=int, help="a LoRA rank per client (e.g. 4 8 16 32): the mixed-rank table"
    )
    ap.add_argument(
        "--strategies",
        nargs="+",
        help="default: all nine (with --ranks: local hetlora flexlora validation prediction)",
    )
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument(
        "--from-results",
        action="store_true",
        help="recompute the statistics, table and plots from the results JSON alone (no run directories)",
    )
    ap.add_argument("--name", help="results file stem (default personalized_quality[_ranks])")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args()
    name = args.name or ("personalized_quality_ranks" if args.ranks else "personalized_quality")
    runs = args.runs or ROOT / "runs" / "bench" / ("pq-ranks" if args.ranks else "pq")
    strategies = args.strategies or (RANK_STRATEGIES if args.ranks else STRATEGIES)
    overrides = [*args.overrides, *([f"lora.ranks=[{','.join(map(str, args.ranks))}]"] if args.ranks else [])]
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    prev = out_dir / f"{name}.json"
    if args.from_results:
        result = json.loads(prev.read_text())
        for body in result["settings"].values():
            seed_statistics(body["strategies"])
        result["plots"] = plot(result, out_dir)
        prev.write_text(json.dumps(result, indent=2))
        (out_dir / f"{name}.md").write_text(markdown(result))
        print(markdown(result))
        return
    t0 = time.perf_counter()
    timings = (
        {}
        if args.collect_only
        else sweep(args.settings, args.seeds, runs, overrides, strategies, grouped=not args.ranks)
    )
    result = collect(args.settings, args.seeds, runs, strategies)
    result["name"] = name
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores (shared), CPU, fp32, torch threads=1"
    result["sweep_seconds"] = None if args.collect_only else time.perf_counter() - t0
    result["run_seconds"] = timings
    result["command"] = " ".join(["python", "bench/personalized_quality.py", *sys.argv[1:]])
    result["plots"] = plot(result, out_dir)
    if args.collect_only and prev.is_file():  # keep the sweep's own timings
        old = json.loads(prev.read_text())
        result["sweep_seconds"], result["run_seconds"] = old.get("sweep_seconds"), old.get("run_seconds", {})
    prev.write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (out_dir / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
