"""Does the gap between personalized strategies grow or shrink with the training budget? (issue 31, item 4)

One setting of bench/personalized_quality.py (default wiki-lang), local / fedavg / validation trust (one
`cotune run` per seed through run.compare), sequences of 128 tokens, at multiples of today's budget: the
warm-up and local steps (today 2 + 3 rounds x 2 = 8 iterations per client) and the training windows a
client holds (today 32) are both multiplied by m, the rounds stay 3. Each multiple is an ordinary
personalized_quality sweep with its own run directories (runs/bench/budget/x<m>, resumable: finished
seeds are skipped) and results file (results/budget_sweep_x<m>.{json,md}); this script then puts the
multiples side by side: each strategy's mean test perplexity over seeds and validation trust minus local
and minus fedavg, paired by seed with their 95% t intervals, in results/budget_sweep.{json,md,png}.

    .venv/bin/python bench/budget_sweep.py                       # x1 x4 x8 x16, seeds 0 1 2, wiki-lang
    .venv/bin/python bench/budget_sweep.py --multiples 1 4 --seeds 0
    .venv/bin/python bench/budget_sweep.py --collect-only        # the side-by-side from finished multiples

Cost on the 2-core CPU (1 torch thread; scaled from personalized_quality's 7-9 min per (setting, seed)
for five strategies at 64 tokens): about 8 min per seed at x1, 25 at x4, 45 at x8, 90 at x16, so about
8.5 h for x1-x16 with 3 seeds. Not measured yet.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from personalized_quality import sweep_by_name  # noqa: E402  (one way to run a personalized sweep)

from cotune.reporting.stats import Summary  # noqa: E402

STRATEGIES = ["local", "fedavg", "validation"]
DECLARED = "validation"
BASELINES = ["local", "fedavg"]
TODAY = {"warmup_steps": 2, "local_steps": 2, "rounds": 3, "max_train_windows": 32}
SEQ_LEN = 128


def iterations(m: int) -> int:
    """Optimizer steps per client at multiple m: the warm-up plus every round's local steps."""
    return m * TODAY["warmup_steps"] + TODAY["rounds"] * m * TODAY["local_steps"]


def overrides(m: int) -> list[str]:
    return [
        f"data.seq_len={SEQ_LEN}",
        f"federation.warmup_steps={m * TODAY['warmup_steps']}",
        f"federation.local_steps={m * TODAY['local_steps']}",
        f"data.max_train_windows={m * TODAY['max_train_windows']}",
    ]


def name_of(m: int) -> str:
    return f"budget_sweep_x{m}"


def run_multiple(setting: str, m: int, seeds: list[int], collect_only: bool) -> dict:
    """One personalized_quality sweep (or its collection) at multiple m: its results."""
    runs = ROOT / "runs" / "bench" / "budget" / f"x{m}"
    return sweep_by_name(name_of(m), [setting], STRATEGIES, seeds, runs, overrides(m), collect_only)


def side_by_side(results: dict[int, dict], setting: str) -> dict:
    """Per multiple: iterations, each strategy's summary over seeds, and the declared paired differences."""
    rows = {}
    for m, result in sorted(results.items()):
        body = result["settings"].get(setting)
        if body is None:
            continue
        strategies = body["strategies"]
        if not all(strategies.get(s, {}).get("summary") for s in STRATEGIES):
            continue  # no seed finished by every strategy yet
        paired = strategies[DECLARED].get("paired", {})
        rows[str(m)] = {
            "iterations": iterations(m),
            "seeds": strategies[DECLARED]["seeds"],
            "levels": {s: strategies[s]["summary"] for s in STRATEGIES},
            "paired": {b: paired[b] for b in BASELINES if b in paired},
        }
    return {"setting": setting, "seq_len": SEQ_LEN, "strategies": STRATEGIES, "multiples": rows}


def as_summary(d: dict) -> Summary:
    return Summary(d["n"], d["mean"], d["se"], d["low"], d["high"], d["confidence"])


def markdown(table: dict) -> str:
    lines = [
        f"Personalized fine-tuning against its training budget: `{table['setting']}`, sequences of "
        f"{table['seq_len']} tokens, SmolLM2-135M-Instruct; each multiple m scales the warm-up and local "
        "steps and the training windows by m (rounds stay 3). Mean final test perplexity over seeds "
        "(clients averaged within their seed); validation trust minus each baseline paired by seed, mean ± "
        "s.e. and 95% t interval ('not significant' when it covers 0). Lower is better.",
        "",
        "| multiple | iterations per client | seeds | "
        + " | ".join(table["strategies"])
        + " | "
        + " | ".join(f"{DECLARED} − {b}" for b in BASELINES)
        + " |",
        "|---|---:|---|" + "---:|" * len(table["strategies"]) + "---|" * len(BASELINES),
    ]
    for m, row in table["multiples"].items():
        levels = [f"{row['levels'][s]['mean']:.2f}" for s in table["strategies"]]
        diffs = []
        for b in BASELINES:
            p = row["paired"].get(b)
            diffs.append("-" if p is None else f"{as_summary(p['summary']).text(2)} {p['verdict']}")
        lines.append(f"| x{m} | {row['iterations']} | {row['seeds']} | " + " | ".join(levels + diffs) + " |")
    if not table["multiples"]:
        lines.append("| (no multiple finished yet) |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    """The paired differences against iterations (log scale), with their 95% intervals as error bars;
    nothing before a multiple has finished."""
    if not table["multiples"]:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    for k, b in enumerate(BASELINES):
        xs, ys, lo, hi = [], [], [], []
        for row in table["multiples"].values():
            p = row["paired"].get(b)
            if p is None:
                continue
            s = p["summary"]
            xs.append(row["iterations"] * (1.03 if k else 1 / 1.03))  # side by side, not on top
            ys.append(s["mean"])
            lo.append(s["mean"] - (s["low"] if s["low"] is not None else s["mean"]))
            hi.append((s["high"] if s["high"] is not None else s["mean"]) - s["mean"])
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=f"{DECLARED} − {b}")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer steps per client")
    ax.set_ylabel("test perplexity difference")
    ax.set_title(
        f"{table['setting']}: paired by seed, 95% t intervals (below 0: validation trust better)", fontsize=8
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--setting", default="wiki-lang")
    ap.add_argument("--multiples", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--collect-only", action="store_true")
    args = ap.parse_args()
    if any(m < 1 for m in args.multiples):
        ap.error("--multiples must be positive integers")
    out_dir = HERE / "results"
    # smallest first: a sweep cut short still has the cheap multiples
    results = {m: run_multiple(args.setting, m, args.seeds, args.collect_only) for m in args.multiples}
    table = side_by_side(results, args.setting)
    table["command"] = " ".join(["python", "bench/budget_sweep.py", *sys.argv[1:]])
    (out_dir / "budget_sweep.json").write_text(json.dumps(table, indent=2))
    (out_dir / "budget_sweep.md").write_text(markdown(table))
    plot(table, out_dir / "budget_sweep.png")
    print(markdown(table))


if __name__ == "__main__":
    main()
