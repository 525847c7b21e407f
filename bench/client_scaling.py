"""Client scaling: round wall time and peak memory for N simulated clients, side by side in one run.

Modes, each measured in its own fresh process (so peak memory is that mode's alone):
  plain       a plain torch + peft loop over the same clients: one base, N adapters, one AdamW each;
              per round every client takes `--steps` steps, then the adapters are averaged (FedAvg)
  sequential  cotune's embedded runtime, personalized family, strategy fedavg, clients one by one
  vectorized  the same with federation.parallel_clients = min(N, --max-parallel) (default 16: one
              forward/backward for up to 16 clients; 64 at once would need ~4x the memory of 16)
  sim1, sim2  the same config on Flower's simulation engine with 1 and 2 Ray actors (CPU runs only)
Every mode trains the same clients (BBC topic news, iid, windows of --seq tokens, batch --batch, LoRA r=4
on q/k/v/o without dropout) for 3 rounds; the figure is the mean wall time of rounds 2-3 (no evaluation
in them: run.eval_every is past the end), and the peak is the largest summed RSS of the mode's process
tree (Ray's workers included), sampled every 0.2 s. Ratios are to the plain loop at the same N.

    python bench/client_scaling.py [--clients 4 16 64] [--modes plain sequential vectorized sim1 sim2]
        [--model smollm2-135m-instruct] [--device cpu|cuda] [--dtype float32|bfloat16] [--name NAME]

Results: bench/results/client_scaling[_NAME].{json,md}; each (mode, N) is kept as it finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ROUNDS = 3
MODES = ["plain", "sequential", "vectorized", "sim1", "sim2"]
LORA = {"r": 4, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
# --model tiny-smollm2: a random model of SmolLM2-135M's shape (its compute, no weights to carry: what
# bench/gpu_check.sh uses on a machine that cannot fetch the real one); --model tiny: the test model
SHAPES = {
    "tiny-smollm2": {
        "hidden_size": 576,
        "num_layers": 30,
        "num_heads": 9,
        "num_kv_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 2048,
    },
    "tiny": {},
}


def model_section(args: argparse.Namespace) -> dict:
    if args.model in SHAPES:
        return {"name": "tiny", "tiny": SHAPES[args.model], "dtype": args.dtype}
    return {"name": args.model, "dtype": args.dtype}


def run_config(args: argparse.Namespace, n: int, out: Path, parallel: int) -> dict:
    """The cotune config every cotune mode runs (parallel: federation.parallel_clients)."""
    return {
        "algorithm": "personalized",
        "device": args.device,
        "model": model_section(args),
        "lora": LORA,
        "data": {
            "sources": [{"corpus": "bbc"}],
            "partition": {"kind": "iid"},
            "seq_len": args.seq,
            "max_train_windows": 8,
            "max_val_windows": 1,
            "test_fraction": 0.0,
            "public_windows": 0,
        },
        "train": {"batch_size": args.batch, "eval_batch_size": args.batch, "lr": 2e-3},
        "federation": {
            "clients": n,
            "rounds": ROUNDS,
            "local_steps": args.steps,
            "warmup_steps": 0,
            "parallel_clients": parallel,
        },
        "strategy": {"name": "fedavg"},
        "run": {"seed": 0, "threads": args.threads, "eval_every": 100, "out_dir": str(out), "name": "run"},
    }


def tree_rss(root: int) -> int:
    """Summed resident memory (bytes) of process `root` and all its descendants."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += [c for c, p in parents.items() if p == pid]
    return total


def measured(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Run `cmd`; its wall time, the peak summed RSS of its process tree, and its output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    return time.perf_counter() - t0, peak[0], output


def cotune_mode(args: argparse.Namespace, mode: str, n: int, env: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cfg = run_config(args, n, out, min(n, args.max_parallel) if mode == "vectorized" else 1)
        path = out / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "cotune.cli.main", "run", str(path)]
        if mode.startswith("sim"):
            actors = int(mode[3:])
            cmd += ["--backend", "flower-simulation", "--client-cpus", str((os.cpu_count() or 2) / actors)]
        wall, peak, _ = measured(cmd, env)
        rounds = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        walls = [r["wall_s"] for r in rounds if r.get("type") == "round" and r["round"] >= 2]
    return {"round_s": sum(walls) / len(walls), "peak_bytes": peak, "process_s": wall}


def plain_mode(args: argparse.Namespace, n: int, env: dict[str, str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-child", str(n), *child_args(args)]
    wall, peak, output = measured(cmd, env)
    result = json.loads(output.strip().splitlines()[-1])
    return {"round_s": result["round_s"], "peak_bytes": peak, "process_s": wall}


def child_args(args: argparse.Namespace) -> list[str]:
    return [
        "--model", args.model, "--device", args.device, "--dtype", args.dtype, "--seq", str(args.seq),
        "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads),
    ]  # fmt: skip


def plain_child(args: argparse.Namespace, n: int) -> None:
    """The plain torch + peft loop (run as its own process): prints {"round_s": ...} as its last line."""
    import torch
    from peft import get_peft_model

    sys.path.insert(0, str(ROOT / "src"))
    from cotune.config.schema import LoraSettings, ModelConfig
    from cotune.models.loader import load_base_model
    from cotune.models.lora import lora_config

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    # the same weights as the cotune modes (cotune's loader only fetches and converts; the loop is plain)
    base, tok = load_base_model(ModelConfig(**model_section(args)), device, dtype)
    base.requires_grad_(False)
    names = [f"client-{i:02d}" for i in range(n)]
    model = get_peft_model(base, lora_config(LoraSettings(**LORA)), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lora_config(LoraSettings(**LORA)))
    params = {name: [p for k, p in model.named_parameters() if f".{name}." in k] for name in names}
    optims = {name: torch.optim.AdamW(params[name], lr=2e-3) for name in names}
    g = torch.Generator().manual_seed(0)
    data = {name: torch.randint(0, min(len(tok), 250), (8, args.seq), generator=g) for name in names}
    walls = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        model.train()
        for name in names:
            model.set_adapter(name)
            for s in range(args.steps):
                ids = data[name][(s * args.batch) % 8 :][: args.batch].to(device)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params[name], 1.0)
                optims[name].step()
                optims[name].zero_grad(set_to_none=True)
        with torch.no_grad():  # FedAvg: every adapter becomes the mean
            for group in zip(*(params[name] for name in names), strict=True):
                mean = torch.stack([p.data for p in group]).mean(0)
                for p in group:
                    p.data.copy_(mean)
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    print(json.dumps({"round_s": sum(walls[1:]) / len(walls[1:])}))


def write(results: dict, args: argparse.Namespace) -> None:
    suffix = f"_{args.name}" if args.name else ""
    out = HERE / "results"
    (out / f"client_scaling{suffix}.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"Client scaling, {args.model} ({results['machine']}); {ROUNDS} rounds of {args.steps} local "
        f"step(s) per client, batch {args.batch} x {args.seq} tokens, LoRA r=4 q/k/v/o, strategy fedavg. "
        "Round = mean wall time of rounds 2-3 (no evaluation); peak = largest summed RSS of the mode's "
        f"process tree. Vectorized trains min(N, {args.max_parallel}) clients at once. Ratios are to the "
        "plain torch + peft loop at the same N (lower is better).",
        "",
        f"    {results['command']}",
        "",
        "| clients | mode | round (s) | round / plain | peak RSS (MiB) | peak / plain |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for n, modes in results["by_clients"].items():
        plain = modes.get("plain")
        for mode, r in modes.items():
            if "error" in r:
                lines.append(f"| {n} | {mode} | failed: {r['error'][:80]} | | | |")
                continue
            rr = f"{r['round_s'] / plain['round_s']:.2f}" if plain and "round_s" in plain else "-"
            pr = f"{r['peak_bytes'] / plain['peak_bytes']:.2f}" if plain and "peak_bytes" in plain else "-"
            lines.append(
                f"| {n} | {mode} | {r['round_s']:.2f} | {rr} | {r['peak_bytes'] / 2**20:.0f} | {pr} |"
            )
    (out / f"client_scaling{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="an asset name, tiny or tiny-smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-parallel", type=int, default=16, help="vectorized: clients at once")
    ap.add_argument("--name", default="")
    ap.add_argument("--plain-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_child is not None:
        plain_child(args, args.plain_child)
        return
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(args.threads),
    }
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {args.device}, {args.dtype}"
    machine += f", torch threads={args.threads}"
    results: dict = {
        "machine": machine,
        "command": " ".join(["python", "bench/client_scaling.py", *sys.argv[1:]]),
        "by_clients": {},
    }
    for n in args.clients:
        for mode in args.modes:
            print(f"[{mode}] {n} clients", file=sys.stderr, flush=True)
            try:
                r = plain_mode(args, n, env) if mode == "plain" else cotune_mode(args, mode, n, env)
            except RuntimeError as exc:
                r = {"error": str(exc).splitlines()[0]}
            results["by_clients"].setdefault(str(n), {})[mode] = r
            write(results, args)


if __name__ == "__main__":
    main()
