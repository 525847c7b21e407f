"""Personalized collaborative fine-tuning quality: five strategies x heterogeneous settings x seeds.

For every setting config in bench/configs/pq-*.yaml and every seed, one `cotune run` (one model
load) trains the same clients with validation trust and, through `run.compare`, local, fedavg,
weight and prediction trust on identical data and initialisation. Run directories go to
runs/bench/pq/<setting>/s<seed>[.<strategy>] (gitignored); a finished run is not rerun, so an
interrupted sweep continues where it stopped. Then the final per-client test perplexities (each client's
held-out documents, unseen by training and by every trust) and validation perplexities are
collected into bench/results/personalized_quality.{json,md} and one per-round plot per setting.

    .venv/bin/python bench/personalized_quality.py [--seeds 0 1 2] [--settings bbc-topic ...]
    .venv/bin/python bench/personalized_quality.py --collect-only    # tables/plots from finished runs
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
SETTINGS = ["bbc-topic", "bbc-mixed", "wiki-lang", "code-prose"]
STRATEGIES = ["local", "fedavg", "weight", "validation", "prediction"]
MAIN = "validation"  # the config's strategy.name; the others come from run.compare


def run_dirs(runs_root: Path, setting: str, seed: int) -> dict[str, Path]:
    main = runs_root / setting / f"s{seed}"
    return {s: (main if s == MAIN else main.with_name(f"{main.name}.{s}")) for s in STRATEGIES}


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


def sweep(settings: list[str], seeds: list[int], runs_root: Path, overrides: list[str]) -> dict:
    timings = {}
    for seed in seeds:  # seed-major: a sweep cut short still has every setting for the first seeds
        for setting in settings:
            dirs = run_dirs(runs_root, setting, seed)
            if all(finished(d) for d in dirs.values()):
                print(f"[skip] {setting} seed {seed}: finished", flush=True)
                continue
            for d in dirs.values():  # a half-finished (setting, seed) starts again from scratch
                if d.exists():
                    subprocess.run(["rm", "-rf", str(d)], check=True)
            cmd = [
                sys.executable,  # this interpreter, with this checkout's source first on its path
                "-m",
                "cotune.cli.main",
                "run",
                str(HERE / "configs" / f"pq-{setting}.yaml"),
                f"run.seed={seed}",
                *overrides,
                "--out",
                str(dirs[MAIN]),
            ]
            print(f"[run] {' '.join(cmd)}", flush=True)
            t0 = time.perf_counter()
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            }
            subprocess.run(cmd, check=True, cwd=ROOT, env=env)
            timings[f"{setting}/s{seed}"] = time.perf_counter() - t0
            print(f"[done] {setting} seed {seed} in {timings[f'{setting}/s{seed}']:.0f} s", flush=True)
    return timings


def _stats(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def collect(settings: list[str], seeds: list[int], runs_root: Path) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from cotune.reporting.metrics import load_run

    out: dict = {"settings": {}}
    for setting in settings:
        per: dict[str, dict] = {}
        budget = None
        # a seed counts once every strategy finished it: the strategies compare on the same seeds
        complete = [
            seed for seed in seeds if all(finished(d) for d in run_dirs(runs_root, setting, seed).values())
        ]
        for s in STRATEGIES:
            final: dict[int, dict[int, float]] = {}  # seed -> client -> test ppl
            final_val: dict[int, dict[int, float]] = {}  # seed -> client -> validation ppl
            curves: dict[int, list[tuple[int, float]]] = {}
            round_wall: list[float] = []
            for seed in complete:
                d = run_dirs(runs_root, setting, seed)[s]
                run = load_run(d)
                assert run.ppl_split == "test", f"{d} has no test split"
                final[seed] = run.final_ppl()
                final_val[seed] = final_val_ppl(d, run.final_round())
                curves[seed] = run.mean_ppl_curve()
                if budget is None:
                    budget = _budget(run.config)
                from cotune.reporting.metrics import read_metrics

                round_wall += [
                    m["wall_s"] for m in read_metrics(d / "metrics.jsonl") if m.get("type") == "round"
                ]
            values = [p for per_client in final.values() for p in per_client.values()]
            seed_means = [statistics.fmean(pc.values()) for pc in final.values() if pc]
            val_values = [p for per_client in final_val.values() for p in per_client.values()]
            per[s] = {
                "final_ppl": {str(k): {str(c): p for c, p in v.items()} for k, v in final.items()},
                "final_val_ppl": {str(k): {str(c): p for c, p in v.items()} for k, v in final_val.items()},
                "mean": _stats(values)[0],
                "val_mean": _stats(val_values)[0],
                "std_over_clients_and_seeds": _stats(values)[1],
                "std_of_seed_means": _stats(seed_means)[1],
                "seeds": sorted(final),
                "curves": {str(k): v for k, v in curves.items()},
                "mean_round_wall_s": statistics.fmean(round_wall) if round_wall else None,
            }
        # wins: per (seed, client), strategy ppl strictly below the reference's
        for s in STRATEGIES:
            wins = {}
            for ref in ("local", "fedavg"):
                w = n = 0
                for seed, pc in per[s]["final_ppl"].items():
                    ref_pc = per[ref]["final_ppl"].get(seed, {})
                    for c, p in pc.items():
                        if c in ref_pc:
                            n += 1
                            w += p < ref_pc[c]
                wins[ref] = [w, n]
            per[s]["wins"] = wins
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
    }


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
        ax.set_title(f"{setting}: mean over seeds (band: ±1 std over seeds)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"personalized_quality_{setting}.png"
        fig.savefig(out_dir / name)
        plt.close(fig)
        files.append(name)
    return files


def markdown(result: dict) -> str:
    lines = [
        f"Personalized collaborative fine-tuning, SmolLM2-135M-Instruct + LoRA ({result['machine']})",
        "",
        "Final per-client **test** perplexity (each client's held-out documents: no training step and no "
        "trust evidence saw them): mean ± std over all (seed, client) pairs [std of the per-seed client "
        "means]; wins = (seed, client) pairs where the strategy's test perplexity is lower than local's / "
        "fedavg's. Lower is better; best mean per setting in bold. `val ppl` is the mean on the validation "
        "windows, which validation trust chose its weights on: its lead there is measured on data it used.",
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
            "| strategy | final test ppl | wins vs local | wins vs fedavg | val ppl | mean round wall |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        best = min(
            (r["mean"] for r in body["strategies"].values() if not math.isnan(r["mean"])), default=None
        )
        for s, r in body["strategies"].items():
            if not r["seeds"]:
                lines.append(f"| {s} | not run | | | | |")
                continue
            cell = f"{r['mean']:.2f} ± {r['std_over_clients_and_seeds']:.2f} [{r['std_of_seed_means']:.2f}]"
            if best is not None and r["mean"] == best:
                cell = f"**{cell}**"
            wl, wf = r["wins"]["local"], r["wins"]["fedavg"]
            wall = f"{r['mean_round_wall_s']:.1f} s" if r["mean_round_wall_s"] else "-"
            lines.append(
                f"| {s} | {cell} | {'-' if s == 'local' else f'{wl[0]}/{wl[1]}'} "
                f"| {'-' if s == 'fedavg' else f'{wf[0]}/{wf[1]}'} | {r['val_mean']:.2f} | {wall} |"
            )
        lines += ["", f"![{setting}](personalized_quality_{setting}.png)", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", nargs="+", default=SETTINGS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench" / "pq")
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args()
    t0 = time.perf_counter()
    timings = {} if args.collect_only else sweep(args.settings, args.seeds, args.runs, args.overrides)
    result = collect(args.settings, args.seeds, args.runs)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores (shared), CPU, fp32, torch threads=1"
    result["sweep_seconds"] = None if args.collect_only else time.perf_counter() - t0
    result["run_seconds"] = timings
    result["command"] = " ".join(["python", "bench/personalized_quality.py", *sys.argv[1:]])
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    result["plots"] = plot(result, out_dir)
    prev = out_dir / "personalized_quality.json"
    if args.collect_only and prev.is_file():  # keep the sweep's own timings
        old = json.loads(prev.read_text())
        result["sweep_seconds"], result["run_seconds"] = old.get("sweep_seconds"), old.get("run_seconds", {})
    prev.write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (out_dir / "personalized_quality.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
