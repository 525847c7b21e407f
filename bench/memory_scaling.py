"""Memory scaling of the embedded personalized runtime: peak RSS with N simulated clients.

Each (model, N) runs in a fresh subprocess: load the model, build N clients' data (BBC, one topic
per client, the same number of windows per client whatever N), run `PersonalizedLoop` for one
round of one local step per client (so every client's AdamW state exists) with fedavg aggregation,
evaluation and checkpointing, then report ru_maxrss. The figure is peak(N)/peak(1), and the bytes
each extra client adds, (peak(N) - peak(1)) / (N - 1), against adapter + AdamW state
(3 x adapter bytes in fp32: weights, exp_avg, exp_avg_sq). "Live" = VmRSS after the run with the
heap glibc kept after frees given back first (malloc_trim, after the peak was reached): what is alive.

With `--trees LABEL=SRC ...` the same runs are made with each cotune source tree (e.g. a clone at an
older commit), side by side in one table; ratios are within a tree.

    .venv/bin/python bench/memory_scaling.py [--models tiny smollm2-135m-instruct] [--clients 1 4 16 64]
        [--trees before=/path/to/old/src after=src] [--name memory_scaling]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}
LORA = {"r": 4, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def config(model: str, n: int, out: Path) -> dict:
    m = {"name": "tiny", "tiny": TINY} if model == "tiny" else {"name": model}
    return {
        "algorithm": "personalized",
        "device": "cpu",
        "model": m,
        "lora": LORA,
        "data": {
            "sources": [{"corpus": "bbc"}],
            "partition": {"kind": "one_label"},
            "seq_len": 64,
            "max_train_windows": 4,
            "max_val_windows": 2,
            "public_windows": 2,
        },
        "train": {"batch_size": 2, "eval_batch_size": 2},
        "federation": {"clients": n, "rounds": 1, "local_steps": 1, "warmup_steps": 0},
        "strategy": {"name": "fedavg"},
        "run": {"seed": 0, "threads": 1, "out_dir": str(out), "name": f"mem-{n}"},
    }


def one(model: str, n: int) -> dict:
    from rich.console import Console

    from cotune.config.schema import ExperimentConfig
    from cotune.runtime import experiment, personalized

    sizes: dict[str, int] = {}
    R = personalized.PersonalizedLoop
    orig_run = R.run

    def run(self, *a, **k):  # resident memory with every client's adapter + AdamW state alive
        sizes["rss_before_runtime"] = _vm("VmRSS")
        orig_run(self, *a, **k)
        sizes["rss_after_round"] = _vm("VmRSS")
        sizes["live_after_round"] = _live()

    R.run = run
    orig_pool = experiment.adapter_pool

    def pool(*a, **k):  # resident memory before any client's adapter exists; the adapter's size
        sizes.setdefault("rss_before_pool", _vm("VmRSS"))
        sizes.setdefault("peak_before_pool", _vm("VmHWM"))  # the peak of loading the model and data
        made = orig_pool(*a, **k)
        sizes["adapter_bytes"] = made.adapter_bytes()
        return made

    experiment.adapter_pool = pool
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExperimentConfig.model_validate(config(model, n, Path(tmp)))
        t0 = time.perf_counter()
        with open(os.devnull, "w") as devnull:
            experiment.run_experiment(cfg, Path(tmp) / f"mem-{n}", Console(file=devnull))
        seconds = time.perf_counter() - t0
    return {
        "model": model,
        "clients": n,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_pool_bytes": sizes["rss_before_pool"],
        "peak_before_pool_bytes": sizes["peak_before_pool"],
        "rss_before_runtime_bytes": sizes["rss_before_runtime"],
        "rss_after_round_bytes": sizes["rss_after_round"],
        "live_after_round_bytes": sizes["live_after_round"],
        "adapter_bytes": sizes["adapter_bytes"],
        "seconds": seconds,
    }


def _live() -> int:
    """VmRSS after collecting garbage and giving glibc's free heap back to the OS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _vm("VmRSS")


def _vm(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes, from /proc/self/status (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m-instruct"])
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--trees", nargs="+", default=None, help="LABEL=SRC: cotune source trees to compare")
    ap.add_argument("--name", default="memory_scaling", help="results file name")
    ap.add_argument(
        "--repeats-of-one",
        type=int,
        default=1,
        help="run N = 1 this many times; the median run is the reference (one run's peak varies by ~100 MiB)",
    )
    ap.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return
    trees = dict(t.split("=", 1) for t in args.trees) if args.trees else {"": ""}
    rows = []
    for model in args.models:
        for n in args.clients:
            for label, src in [
                item for item in trees.items() for _ in range(args.repeats_of_one if n == 1 else 1)
            ]:
                env = dict(os.environ)
                if src:
                    env["PYTHONPATH"] = str(Path(src).resolve()) + os.pathsep + env.get("PYTHONPATH", "")
                out = subprocess.run(
                    [sys.executable, __file__, "--one", model, str(n)],
                    check=True,
                    capture_output=True,
                    text=True,
                    env=env,
                ).stdout
                rows.append({"tree": label, **json.loads(out.strip().splitlines()[-1])})
                print(json.dumps(rows[-1]), file=sys.stderr)
    for model, label in ((m, t) for m in args.models for t in trees):
        mine = [r for r in rows if r["model"] == model and r["tree"] == label]
        ones = sorted((r for r in mine if r["clients"] == 1), key=lambda r: r["peak_rss_bytes"])
        base = ones[(len(ones) - 1) // 2] if ones else mine[0]  # the median run of N = 1
        base["reference"] = True
        for r in mine:
            r["peak_ratio"] = r["peak_rss_bytes"] / base["peak_rss_bytes"]
            extra = r["clients"] - base["clients"]
            r["bytes_per_extra_client"] = (
                (r["peak_rss_bytes"] - base["peak_rss_bytes"]) / extra if extra > 0 else None
            )
            r["adapter_plus_adamw_bytes"] = 3 * r["adapter_bytes"]
            # the clients' own growth: resident after the round minus resident before the adapter pool
            # (cancels the run-to-run noise of loading the model and building the data, ~10 MiB)
            r["client_growth_bytes"] = r["rss_after_round_bytes"] - r["rss_before_pool_bytes"]
            base_growth = base["rss_after_round_bytes"] - base["rss_before_pool_bytes"]
            r["resident_bytes_per_extra_client"] = (
                (r["client_growth_bytes"] - base_growth) / extra if extra > 0 else None
            )
            r["live_bytes_per_extra_client"] = (
                (r["live_after_round_bytes"] - base["live_after_round_bytes"]) / extra if extra > 0 else None
            )
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU, fp32"
    md = [
        f"Memory of the embedded personalized runtime vs simulated clients ({machine}); one round, one "
        "local step per client (batch 2 x 64 tokens), fedavg, evaluation + checkpoint, LoRA r=4 on q/k/v/o. "
        "Peak = ru_maxrss of the whole process (peak of loading: VmHWM before the clients' adapters "
        "exist); growth = VmRSS right after the round (every client's "
        "adapter and AdamW state alive) minus VmRSS before the adapter pool was built; per extra client = "
        "(X(N) - X(1)) / (N - 1); live = VmRSS after the run once glibc gave its free heap back "
        "(malloc_trim); * = the reference run of N = 1 (the median of its repeats); "
        "adapter + AdamW = 3 x adapter bytes (weights, exp_avg, exp_avg_sq; fp32).",
        "",
        "| tree | model | clients | peak RSS | peak of loading | peak(N)/peak(1) | peak per extra client "
        "| growth "
        "| growth per extra client | live per extra client | adapter + AdamW "
        "| growth per client / (adapter + AdamW) | wall |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def mib(x: float | None) -> str:
        return "-" if x is None else f"{x / 2**20:.2f} MiB"

    for r in rows:
        res = r["resident_bytes_per_extra_client"]
        share = "-" if res is None else f"{res / r['adapter_plus_adamw_bytes']:.2f}"
        md.append(
            f"| {r['tree'] or '-'} | {r['model']} | {r['clients']}{'*' if r.get('reference') else ''} "
            f"| {r['peak_rss_bytes'] / 2**20:.0f} MiB "
            f"| {r['peak_before_pool_bytes'] / 2**20:.0f} MiB "
            f"| {r['peak_ratio']:.3f} "
            f"| {mib(r['bytes_per_extra_client'])} | {r['client_growth_bytes'] / 2**20:.1f} MiB "
            f"| {mib(res)} | {mib(r['live_bytes_per_extra_client'])} "
            f"| {mib(r['adapter_plus_adamw_bytes'])} | {share} | {r['seconds']:.0f} s |"
        )
    text = "\n".join(md) + "\n"
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "rows": rows,
                "command": " ".join(["python", "bench/memory_scaling.py", *sys.argv[1:]]),
            },
            indent=2,
        )
    )
    (out_dir / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
