"""Quality against bytes for each exchange codec (issue 33, item 2): `federation.compress`.

Two families, the same codecs, 3 seeds each, every codec on the same data, seed and initialisation:
- personalized, SmolLM2-135M (bench/configs/pq-<setting>.yaml, default bbc-topic and wiki-lang): fedavg and
  validation trust (one `cotune run` per seed through run.compare), final per-client test perplexity; each
  codec is an ordinary personalized_quality sweep with its own run directories and results file
  (runs/bench/compress/<codec>, results/compression_<codec>.json), resumable;
- the FedCoLLM family's `fedavg` on the Qwen SLM (bench/configs/fedcollm-qwen-bbc.yaml with algorithm fedavg:
  it compresses the same theta exchange as fedcollm, without the hours of the LLM), SLM test accuracy on BBC
  topics; runs/bench/compress-fedavg/<codec>/s<seed>, a finished run skipped.
Bytes are what the comm records count: the encoded size of every adapter sent, both directions, per client
and round. The table gives each codec's bytes against the uncompressed run's (x fewer), its quality (mean
over seeds ± s.e.), the difference to the uncompressed run paired by seed with its 95% t interval, and
whether the codec's mean lies inside the uncompressed run's 95% interval over seeds (the issue's goal:
>= 8x fewer bytes with quality inside it).

    .venv/bin/python bench/compression_pareto.py                          # everything (hours)
    .venv/bin/python bench/compression_pareto.py --families personalized --seeds 0 --codecs none int8
    .venv/bin/python bench/compression_pareto.py --collect-only

Cost on the 2-core CPU, 1 thread (not measured; scaled from personalized_quality and the Qwen runs): about
4 min per personalized (setting, seed, codec) and 10 min per FedCoLLM fedavg run: 2 h + 2.5 h for 5 codecs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from fedcollm_quality import run_cotune  # noqa: E402  (one way to run a cotune command)
from personalized_quality import sweep_by_name  # noqa: E402  (one way to run a personalized sweep)

from cotune.reporting.metrics import read_metrics  # noqa: E402
from cotune.reporting.stats import Summary, paired_difference, summarize  # noqa: E402

# name -> the federation.compress overrides (none: today's float32 exchange)
CODECS: dict[str, list[str]] = {
    "none": [],
    "fp16": ["federation.compress.codec=fp16"],
    "int8": ["federation.compress.codec=int8"],
    "nf4": ["federation.compress.codec=nf4"],
    "nf4-top10": ["federation.compress.codec=nf4", "federation.compress.topk=0.1"],
}
SETTINGS = ["bbc-topic", "wiki-lang"]
PERSONALIZED = ["fedavg", "validation"]
FEDAVG_CONFIG = HERE / "configs" / "fedcollm-qwen-bbc.yaml"


# ---------------------------------------------------------------------------------- personalized family
def personalized(codec: str, settings: list[str], seeds: list[int], collect_only: bool) -> dict[str, Any]:
    """One personalized_quality sweep (or its collection) with the codec: its results."""
    runs = ROOT / "runs" / "bench" / "compress" / codec
    return sweep_by_name(
        f"compression_{codec}", settings, PERSONALIZED, seeds, runs, CODECS[codec], collect_only
    )


def personalized_points(result: dict[str, Any], setting: str, strategy: str) -> dict[str, Any] | None:
    """Seed means of the test perplexity and the mean bytes per client and round (up + down)."""
    body = (result["settings"].get(setting) or {}).get("strategies", {}).get(strategy)
    if not body or not body.get("seed_means"):
        return None
    up = list(body["bytes_up_per_round"].values())
    down = list(body.get("bytes_down_per_round", {}).values())
    per_round = statistics.fmean(up) + (statistics.fmean(down) if down else 0.0) if up else 0.0
    return {
        "by_seed": {int(k): v for k, v in body["seed_means"].items()},
        "bytes_per_client_round": per_round,
    }


# ------------------------------------------------------------------------------- FedCoLLM family's fedavg
def fedavg_dir(codec: str, seed: int) -> Path:
    return ROOT / "runs" / "bench" / "compress-fedavg" / codec / f"s{seed}"


def ended(d: Path) -> bool:
    m = d / "metrics.jsonl"
    return m.is_file() and '"event":"end"' in m.read_text()


def run_fedavg(codec: str, seed: int) -> None:
    d = fedavg_dir(codec, seed)
    if ended(d):
        print(f"[skip] fedavg {codec} seed {seed}: finished", flush=True)
        return
    resume = (d / "checkpoints").is_dir()
    cmd = [sys.executable, "-m", "cotune.cli.main", "run"]
    cmd += ["--resume", str(d)] if resume else [str(FEDAVG_CONFIG), "algorithm=fedavg", f"run.seed={seed}"]
    cmd += [] if resume else [*CODECS[codec], "--out", str(d)]
    print(f"[run] {' '.join(cmd)}", flush=True)
    run_cotune(cmd)


def fedavg_point(d: Path) -> tuple[float, float] | None:
    """(final SLM test accuracy, mean bytes per client and round up + down) of a finished fedavg run."""
    if not ended(d):
        return None
    records = read_metrics(d / "metrics.jsonl")
    mc = [m for m in records if m.get("type") == "mc" and m.get("model") == "slm" and m.get("client") is None]
    comm = [m for m in records if m.get("type") == "comm"]
    if not mc or not comm:
        return None
    final = max(mc, key=lambda m: m["round"])
    return final["acc"], statistics.fmean(m["bytes_up"] + m["bytes_down"] for m in comm)


def fedavg_points(codec: str, seeds: list[int]) -> dict[str, Any] | None:
    points = {s: p for s in seeds if (p := fedavg_point(fedavg_dir(codec, s))) is not None}
    if not points:
        return None
    return {
        "by_seed": {s: acc for s, (acc, _) in points.items()},
        "bytes_per_client_round": statistics.fmean(b for _, b in points.values()),
    }


# ----------------------------------------------------------------------------------------------- tables
def summary_dict(s: Summary) -> dict[str, Any]:
    return {"n": s.n, "mean": s.mean, "se": s.se, "low": s.low, "high": s.high}


def frontier(points: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """Per codec: bytes and x fewer than none, the quality summary over seeds, the paired difference to
    none, and whether its mean lies inside none's 95% interval."""
    base = points.get("none")
    base_summary = summarize(list(base["by_seed"].values())) if base else None
    rows = {}
    for codec, p in points.items():
        if p is None:
            continue
        s = summarize(list(p["by_seed"].values()))
        row: dict[str, Any] = {
            "bytes_per_client_round": p["bytes_per_client_round"],
            "quality": summary_dict(s),
        }
        if base is not None and base_summary is not None:
            row["x_fewer_bytes"] = base["bytes_per_client_round"] / p["bytes_per_client_round"]
            if codec != "none" and set(p["by_seed"]) & set(base["by_seed"]):
                d = paired_difference(p["by_seed"], base["by_seed"])
                row["vs_none"] = {**summary_dict(d.summary), "verdict": d.summary.verdict()}
            low, high = base_summary.low, base_summary.high
            row["inside_none_interval"] = None if low is None or high is None else low <= s.mean <= high
        rows[codec] = row
    return rows


def markdown(tables: dict[str, dict[str, Any]], quality: dict[str, str]) -> str:
    lines = [
        "Compressed exchanges: quality against bytes (`federation.compress`); bytes are the encoded adapters "
        "the comm records count, both directions, mean per client and round. Quality is the mean over seeds "
        "± s.e.; `vs none` is the difference paired by seed with its 95% t interval; `inside` says whether "
        "the codec's mean lies inside the uncompressed run's 95% interval over seeds.",
        "",
    ]
    for name, rows in tables.items():
        lines += [f"### {name} ({quality[name]})", ""]
        if not rows:
            lines += ["no finished run yet", ""]
            continue
        lines += [
            "| codec | bytes / client / round | x fewer | quality | vs none | inside |",
            "|---|---:|---:|---|---|---|",
        ]
        for codec, r in rows.items():
            q = r["quality"]
            level = f"{q['mean']:.3f}" + (f" ± {q['se']:.3f}" if q["se"] is not None else "")
            vs = r.get("vs_none")
            vs_text = "-"
            if vs is not None:
                diff = Summary(vs["n"], vs["mean"], vs["se"], vs["low"], vs["high"])
                vs_text = f"{diff.text(3)} {vs['verdict']}"
            inside = {True: "yes", False: "no", None: "-"}[r.get("inside_none_interval")]
            fewer = f"{r['x_fewer_bytes']:.1f}x" if "x_fewer_bytes" in r else "-"
            kb = r["bytes_per_client_round"] / 1e3
            lines.append(f"| {codec} | {kb:.1f} kB | {fewer} | {level} | {vs_text} | {inside} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--families", nargs="+", choices=["personalized", "fedavg"], default=["personalized", "fedavg"]
    )
    ap.add_argument("--settings", nargs="+", default=SETTINGS)
    ap.add_argument("--codecs", nargs="+", choices=list(CODECS), default=list(CODECS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--collect-only", action="store_true")
    args = ap.parse_args()
    tables: dict[str, dict[str, Any]] = {}
    quality: dict[str, str] = {}
    if "personalized" in args.families:
        results = {c: personalized(c, args.settings, args.seeds, args.collect_only) for c in args.codecs}
        for setting in args.settings:
            for strategy in PERSONALIZED:
                name = f"personalized {setting}, {strategy}"
                tables[name] = frontier(
                    {c: personalized_points(r, setting, strategy) for c, r in results.items()}
                )
                quality[name] = "final test perplexity, lower is better"
    if "fedavg" in args.families:
        for seed in args.seeds:  # seed-major: a sweep cut short has every codec for the first seeds
            for codec in args.codecs:
                if not args.collect_only:
                    run_fedavg(codec, seed)
        name = "FedCoLLM family fedavg, Qwen2.5-Coder-0.5B SLM, BBC topic"
        tables[name] = frontier({c: fedavg_points(c, args.seeds) for c in args.codecs})
        quality[name] = "SLM test accuracy, higher is better"
    out = {"tables": tables, "command": " ".join(["python", "bench/compression_pareto.py", *sys.argv[1:]])}
    (HERE / "results" / "compression_pareto.json").write_text(json.dumps(out, indent=2))
    text = markdown(tables, quality)
    (HERE / "results" / "compression_pareto.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
