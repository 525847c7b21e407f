"""The distillation weight λ of FedCoLLM, chosen on the server's validation split only (issue 31, item 1).

For each seed, on one config (same splits, same client randomness), it runs:
- FedCoLLM at each λ of the grid (default 0.25 0.5 1 2; `distill.lam`),
- λ = 0: the control `fedavg_ft` — FedAvg plus the same server SLM steps with cross-entropy only, whose
  SLM equals FedCoLLM's at λ = 0 bit for bit (tests/test_cotuning.py) without paying for the LLM,
- FedAvg, the baseline.
Every variant with server steps keeps the step of its best validation score (FedCoLLM's rule, applied
alike). λ is then chosen per seed by the SLM's kept validation score in the final round (`val_merit`:
accuracy, then loss; a generation task: loss), never by a test figure. Reported: the test figure at each
λ (mean, s.e., 95% t interval over seeds), the λ each seed chose and its validation score, and the chosen
λ's test figure paired by seed against FedAvg, against λ = 0 (what the LLM adds at the chosen weight) and
against λ = 1 (the default). The test figure is the SLM's final accuracy (multiple choice) or ROUGE-L
(generation). Resumable: rerun the same command; an ended run is kept, a killed one resumes.

    PYTHONPATH=src .venv/bin/python bench/lambda_sweep.py --config bench/configs/fedcollm-qwen-bbc.yaml \
        --name qwen-bbc --seeds 0 1 2 [--lams 0.25 0.5 1 2] [overrides ...]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from fedcollm_quality import (  # noqa: E402  (one definition of a run's state, provenance and saving)
    COMMITS,
    GENERATION,
    cotune_command,
    ended,
    gen_figures,
    interval_text,
    kind_of,
    mc_figures,
    mean_se_text,
    provenance,
    run_cotune,
    save_results,
    source_commit,
)

from cotune.records import val_merit  # noqa: E402
from cotune.reporting.metrics import load_run  # noqa: E402
from cotune.reporting.stats import Summary, paired_difference, summarize  # noqa: E402

DEFAULT_LAMS = (0.25, 0.5, 1.0, 2.0)
CONTROL, BASELINE = "fedavg_ft", "fedavg"
FIGURE = {CONTROL: "slm_fedavg_ft", BASELINE: "slm_fedavg", "fedcollm": "slm_fedcollm"}


def lam_name(lam: float) -> str:
    """A run directory's name for a weight: lam-0 (the control), lam-0.25, lam-1, ..."""
    return f"lam-{lam:g}"


def variants(lams: list[float]) -> dict[str, tuple[str, float | None]]:
    """directory name -> (algorithm, λ or None): FedAvg, the λ = 0 control, FedCoLLM at each λ > 0."""
    out: dict[str, tuple[str, float | None]] = {BASELINE: (BASELINE, None), lam_name(0.0): (CONTROL, 0.0)}
    out.update({lam_name(lam): ("fedcollm", lam) for lam in lams if lam > 0})
    return out


def run_variant(
    config: Path, overrides: list[str], seed: int, d: Path, algorithm: str, lam: float | None
) -> bool:
    """Run (or resume) one variant of one seed; False when it had ended already (kept)."""
    if ended(d):
        print(f"[keep] {d}", flush=True)
        return False
    if (d / "checkpoints").is_dir():
        cmd = [*cotune_command(), "run", "--resume", str(d)]
    else:
        lam_override = [] if lam is None or algorithm == CONTROL else [f"distill.lam={lam:g}"]
        cmd = [*cotune_command(), "run", str(config), f"algorithm={algorithm}", "run.compare=[]"]
        cmd += [*lam_override, *overrides, f"run.seed={seed}", "--out", str(d)]
    d.parent.mkdir(parents=True, exist_ok=True)
    with (d.parent / COMMITS).open("a") as f:
        f.write(source_commit() + "\n")
    print("[run]", " ".join(cmd), flush=True)
    run_cotune(cmd)
    return True


def kept_validation(run: Any) -> tuple[float | None, float] | None:
    """The SLM's validation score (accuracy or None, loss) at the step its final round kept: the score λ is
    chosen by. None for a run without server steps (FedAvg) or without validation records."""
    if not run.distill_val:
        return None
    last = max(r.round for r in run.distill_val)
    scores = {r.step: r for r in run.distill_val if r.round == last and r.model == "slm"}
    if not scores:
        return None
    record = next((r for r in run.distill if r.round == last), None)
    step = record.slm_kept if record is not None and record.slm_kept is not None else max(scores)
    chosen = scores.get(step, scores[max(scores)])
    return chosen.acc, chosen.nll


def test_figure(run: Any, algorithm: str) -> float | None:
    """The SLM's final test figure of one run: accuracy (multiple choice) or ROUGE-L (generation)."""
    by = {algorithm: run}
    if kind_of(run.config) is GENERATION:
        return gen_figures(by)["rouge_l"][FIGURE[algorithm]]
    return mc_figures(by)["accuracy"][FIGURE[algorithm]]


def collect(root: Path, seeds: list[int], lams: list[float]) -> dict[str, Any]:
    """Per seed and variant: the test figure and the kept validation score; the λ each seed chose."""
    per_seed: dict[str, dict[str, Any]] = {}
    for seed in seeds:
        rows: dict[str, Any] = {}
        for name, (algorithm, lam) in variants(lams).items():
            d = root / f"seed-{seed}" / name
            if not ended(d):
                continue
            run = load_run(d)
            val = kept_validation(run)
            rows[name] = {"lam": lam, "test": test_figure(run, algorithm), "val": val}
        candidates = {n: r for n, r in rows.items() if r["lam"] is not None and r["val"] is not None}
        if len(candidates) == len([v for v in variants(lams).values() if v[1] is not None]):
            best = max(candidates, key=lambda n: val_merit(*candidates[n]["val"]))
            rows["chosen"] = {"name": best, "lam": candidates[best]["lam"], "test": candidates[best]["test"]}
        per_seed[str(seed)] = rows
    return per_seed


def series(per_seed: dict[str, dict[str, Any]], name: str) -> dict[int, float]:
    """{seed: test figure} of one variant (or "chosen"), on the seeds where it ended with a figure."""
    out = {}
    for seed, rows in per_seed.items():
        value = (rows.get(name) or {}).get("test")
        if value is not None and math.isfinite(value):
            out[int(seed)] = float(value)
    return out


def summary_json(s: Summary) -> dict[str, Any]:
    return {"n": s.n, "mean": s.mean, "se": s.se, "low": s.low, "high": s.high, "verdict": s.verdict()}


def report(
    per_seed: dict[str, dict[str, Any]], lams: list[float], scale: float, unit: str
) -> tuple[dict, str]:
    """The result's JSON part and its Markdown: the figure per λ, the choices, the chosen λ paired."""
    names = list(variants(lams))
    levels = {n: summarize(list(v.values())) for n in [*names, "chosen"] if (v := series(per_seed, n))}
    pairs: dict[str, Any] = {}
    chosen = series(per_seed, "chosen")
    for other, label in ((BASELINE, "FedAvg"), (lam_name(0.0), "λ = 0 (control)"), (lam_name(1.0), "λ = 1")):
        against = series(per_seed, other)
        if chosen and set(chosen) & set(against):
            p = paired_difference(chosen, against)
            pairs[f"chosen λ − {label}"] = {"by_seed": p.by_seed, "summary": summary_json(p.summary)}
    lines = [f"| variant | {' | '.join(f'seed {s}' for s in per_seed)} | mean ± s.e. | 95% t interval |"]
    lines.append("|---" * (len(per_seed) + 3) + "|")
    labels = {
        BASELINE: "FedAvg",
        lam_name(0.0): "λ = 0 (control: fedavg_ft)",
        "chosen": "λ chosen on validation",
    }
    for n in [*names, "chosen"]:
        cells = [
            "–" if (v := (per_seed[s].get(n) or {}).get("test")) is None else f"{v * scale:.2f}"
            for s in per_seed
        ]
        level = (
            [mean_se_text(levels[n], scale), interval_text(levels[n], scale)] if n in levels else ["–", "–"]
        )
        label = labels.get(n, n.replace("lam-", "FedCoLLM λ = "))
        lines.append(f"| {label} | {' | '.join([*cells, *level])} |")
    choices = ", ".join(f"seed {s}: λ = {r['chosen']['lam']:g}" for s, r in per_seed.items() if "chosen" in r)
    text = [f"SLM test {unit} by distillation weight λ (every variant keeps its best validation step):", ""]
    text += [
        *lines,
        "",
        f"λ chosen by the SLM's kept server-validation score in the final round: {choices or '–'}.",
    ]
    text += ["", "| paired by seed | mean ± s.e. | 95% t interval | verdict |", "|---|---|---|---|"]
    for label, p in pairs.items():
        s = p["summary"]
        diff = Summary(s["n"], s["mean"], s["se"], s["low"], s["high"])
        cells = [
            mean_se_text(diff, scale, signed=True),
            interval_text(diff, scale, signed=True),
            diff.verdict(),
        ]
        text.append(f"| {label} | {' | '.join(cells)} |")
    result = {
        "levels": {n: summary_json(s) for n, s in levels.items()},
        "paired": pairs,
        "chosen": {s: r["chosen"] for s, r in per_seed.items() if "chosen" in r},
    }
    return result, "\n".join(text) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--name", default=None, help="results name (default: the config's stem)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lams", type=float, nargs="+", default=list(DEFAULT_LAMS), help="λ > 0 (0 always runs)")
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench", help="where the run directories go")
    ap.add_argument("--results", type=Path, default=HERE / "results", help="where the tables go")
    ap.add_argument("overrides", nargs="*", help="dotted overrides (budgets), e.g. federation.rounds=1")
    args = ap.parse_args()
    if any(lam <= 0 for lam in args.lams):
        ap.error("--lams takes weights > 0: λ = 0 (the control) always runs")
    name = args.name or args.config.stem
    root = args.runs.resolve() / f"lambda-{name}"
    seconds: dict[str, float] = {}
    if not args.collect_only:
        for seed in args.seeds:
            t0 = time.perf_counter()
            for d_name, (algorithm, lam) in variants(args.lams).items():
                run_variant(args.config, args.overrides, seed, root / f"seed-{seed}" / d_name, algorithm, lam)
            seconds[str(seed)] = time.perf_counter() - t0
    per_seed = collect(root, args.seeds, args.lams)
    any_run = next((root / f"seed-{s}" / n for s in args.seeds for n in variants(args.lams)), None)
    generation = any_run is not None and ended(any_run) and kind_of(load_run(any_run).config) is GENERATION
    scale, unit = (100.0, "ROUGE-L (×100)") if generation else (100.0, "accuracy (%)")
    result, text = report(per_seed, args.lams, scale, unit)
    where = provenance("lambda_sweep.py")
    header = f"# λ sweep: {name}\n\n`{where['command']}` at {where['commit']}, {where['machine']}.\n\n"
    data = {**where, "per_seed": per_seed, **result, "seconds_by_seed": seconds}
    save_results(args.results, f"lambda_sweep_{name}", data, header + text)


if __name__ == "__main__":
    main()
