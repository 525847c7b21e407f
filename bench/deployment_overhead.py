"""Deployment overhead: a round on real SuperNodes against the same round embedded, side by side in one run.

One config (default: examples/quickstart.yaml, SmolLM2-135M, validation trust, cut to 2 clients and 2
rounds) run three ways, one after the other on this machine:
  embedded            `cotune run` in one process
  supernodes          a local Flower deployment (SuperLink + one SuperNode per client on 127.0.0.1):
                      every message's work in the fresh ClientApp process Flower starts for it
  supernodes+workers  the same with a node worker beside each SuperNode (`cotune flower worker`): the
                      ClientApp process forwards the message to it (imports, model, data kept)
The adapters of the three are compared (bit for bit expected). Round = mean wall time of rounds 1..R
from the runs' own round records (the server's loop: training, trust evidence, aggregation,
evaluation, checkpoint). Per message, from the ClientApp's log line: how long its process had run
before the handler (Flower's process start + imports) and the handler itself (node build + work, or
the worker round trip). What is left of a round is Flower's delivery: the SuperNode's 3 s poll of the
SuperLink, its SuperExec's poll (0.2 s here, FLWR_SUPEREXEC_TASK_POLL_INTERVAL) and the ServerApp's
poll for replies.

    python bench/deployment_overhead.py [--config CONFIG] [--modes ...] [key=value ...]

Results: bench/results/deployment_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

from cotune.config import load_config  # noqa: E402
from cotune.reporting.metrics import read_metrics  # noqa: E402
from cotune.runtime.backends import FlowerOptions  # noqa: E402
from cotune.runtime.experiment import run_experiment  # noqa: E402
from cotune.runtime.flower.deploy import LocalFederation  # noqa: E402

MODES = ["embedded", "supernodes", "supernodes+workers"]
DEFAULT_OVERRIDES = [
    "federation.clients=2",
    "federation.rounds=2",
    "run.compare=[]",
    "device=cpu",
    "run.threads=1",
]
LINE = re.compile(
    r"cotune node (\d+): (\S+) handled in ([\d.]+) s (by its worker|here); "
    r"this process started ([\d.]+) s before"
)


READY = re.compile(r"cotune node (\d+): ready in ([\d.]+) s \(model, adapter, data, state\), work ([\d.]+) s")


def readiness_of(work_dir: Path) -> dict[str, float]:
    """Mean time a node took to be ready for a message's work (base model, adapter, data, its state
    restored), and the work itself, over every message (SuperNode logs and node worker logs)."""
    found = [
        m for log in work_dir.glob("supernode-*.log") for m in READY.finditer(log.read_text(errors="replace"))
    ]
    if not found:
        return {}
    return {
        "ready_s": statistics.mean(float(m[2]) for m in found),
        "work_s": statistics.mean(float(m[3]) for m in found),
        "messages": len(found),
    }


def rounds_of(run_dir: Path) -> list[float]:
    return [float(m["wall_s"]) for m in read_metrics(run_dir / "metrics.jsonl") if m["type"] == "round"]


def messages_of(work_dir: Path) -> list[dict]:
    found = []
    for log in sorted(work_dir.glob("supernode-*.log")):
        for m in LINE.finditer(log.read_text(errors="replace")):
            found.append({"node": int(m[1]), "type": m[2], "handler_s": float(m[3]), "before_s": float(m[5])})
    return found


def run_mode(mode: str, cfg, out: Path) -> dict:
    t0 = time.perf_counter()
    if mode == "embedded":
        (run_dir,) = run_experiment(cfg, out / "run")
        messages: list[dict] = []
        readiness: dict[str, float] = {}
    else:
        with LocalFederation(
            cfg.federation.clients, out / "federation", workers=mode.endswith("workers")
        ) as fed:
            (run_dir,) = run_experiment(
                cfg, out / "run", backend="flower", options=FlowerOptions(superlink=fed.address, timeout=3600)
            )
            messages = messages_of(fed.work_dir)
            readiness = readiness_of(fed.work_dir)
    walls = rounds_of(run_dir)
    return {
        "round_s": statistics.mean(walls),
        "rounds_s": walls,
        "process_s": time.perf_counter() - t0,
        "messages": messages,
        "node": readiness,
        "run_dir": run_dir,
    }


def per_type(messages: list[dict]) -> dict[str, dict[str, float]]:
    by: dict[str, list[dict]] = defaultdict(list)
    for m in messages:
        by[m["type"]].append(m)
    return {
        t: {
            "count": len(ms),
            "before_s": statistics.mean(m["before_s"] for m in ms),
            "handler_s": statistics.mean(m["handler_s"] for m in ms),
        }
        for t, ms in sorted(by.items())
    }


def adapter_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    from cotune.runtime.checkpoint import latest_checkpoint

    pa, pb = latest_checkpoint(a)[1], latest_checkpoint(b)[1]
    worst = 0.0
    for d in sorted(p for p in pa.glob("client-*") if p.is_dir()):
        x, y = (
            load_file(str(d / "adapter_model.safetensors")),
            load_file(str(pb / d.name / "adapter_model.safetensors")),
        )
        worst = max(worst, *(float((x[k] - y[k]).abs().max()) for k in x))
    return worst


def write(results: dict) -> None:
    out = HERE / "results"
    (out / "deployment_overhead.json").write_text(json.dumps(results, indent=2, default=str))
    base = results["modes"].get("embedded", {}).get("round_s")
    lines = [
        f"Deployment overhead ({results['machine']}): {results['setting']}. Round = mean wall time of the "
        "rounds from the runs' own records; every mode ran in this one session, one after the other.",
        "",
        f"    {results['command']}",
        "",
        "| mode | round (s) | round / embedded | whole run (s) | max adapter diff vs embedded |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, r in results["modes"].items():
        ratio = f"{r['round_s'] / base:.2f}" if base else "-"
        diff = r.get("adapter_diff_vs_embedded", "-")
        lines.append(f"| {mode} | {r['round_s']:.2f} | {ratio} | {r['process_s']:.1f} | {diff} |")
    lines += [
        "",
        "Per message (mean): how long the ClientApp process Flower started for it had run before the "
        "handler (process start + imports), and the handler (node build + work here, or the round trip "
        "to the worker).",
        "",
        "| mode | message | count | process start -> handler (s) | handler (s) |",
        "|---|---|---:|---:|---:|",
    ]
    for mode, r in results["modes"].items():
        for t, s in r.get("per_type", {}).items():
            lines.append(f"| {mode} | {t} | {s['count']} | {s['before_s']:.2f} | {s['handler_s']:.2f} |")
    lines += [
        "",
        "Inside the handler (mean over every message): the node made ready for the work (base model wrapped "
        "in the adapter, data, its state restored from its state-dir) and the work itself.",
        "",
        "| mode | messages | node ready (s) | work (s) |",
        "|---|---:|---:|---:|",
    ]
    for mode, r in results["modes"].items():
        if r.get("node"):
            n = r["node"]
            lines.append(f"| {mode} | {n['messages']} | {n['ready_s']:.2f} | {n['work_s']:.2f} |")
    (out / "deployment_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"))
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument(
        "overrides", nargs="*", help="key=value, after the defaults " + " ".join(DEFAULT_OVERRIDES)
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(args.config, [*DEFAULT_OVERRIDES, *args.overrides])
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, cpu, torch threads={cfg.run.threads}",
        "setting": (
            f"{Path(args.config).name}, {cfg.model.name}, {cfg.federation.clients} clients, "
            f"{cfg.federation.rounds} rounds of {cfg.federation.local_steps} local steps, "
            f"strategy {cfg.strategy.name}"
        ),
        "command": "python bench/deployment_overhead.py " + " ".join(sys.argv[1:]),
        "modes": {},
    }
    with tempfile.TemporaryDirectory(prefix="cotune-deploy-") as tmp:
        for mode in args.modes:
            print(f"== {mode}", flush=True)
            r = run_mode(mode, cfg, Path(tmp) / mode.replace("+", "-"))
            r["per_type"] = per_type(r.pop("messages"))
            results["modes"][mode] = r
        embedded = results["modes"].get("embedded")
        for mode, r in results["modes"].items():
            if embedded and mode != "embedded":
                r["adapter_diff_vs_embedded"] = adapter_diff(embedded["run_dir"], r["run_dir"])
        for r in results["modes"].values():
            r.pop("run_dir")
    write(results)


if __name__ == "__main__":
    main()
