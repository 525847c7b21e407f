"""Training throughput: cotune's local training step against a minimal PyTorch + peft loop.

Both run in ONE process on the same model (two separate copies of the same weights), the same
LoRA settings, batch, sequence length and token ids. They alternate in blocks of `--steps`
optimizer steps for `--reps` repetitions (the order flips every repetition), so background load
hits both alike; the figure is median tokens/s of cotune / median tokens/s of the plain loop.

cotune side: `AdapterPool` (peft multi-adapter model) + `make_optimizer`/`make_scheduler` +
`training.loop.train_step` (what `PersonalizedRuntime.train_round` calls per step).
plain side: `AutoModelForCausalLM.from_pretrained` on the cached model directory, `get_peft_model`,
`torch.optim.AdamW`, forward with labels, backward, `clip_grad_norm_`, step, `zero_grad`.

    .venv/bin/python bench/throughput.py [--model smollm2-135m-instruct] [--batch 4] [--seq 128]
        [--steps 1] [--reps 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps per timed block")
    ap.add_argument("--reps", type=int, default=16, help="timed blocks per side")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from cotune.config.schema import LoraSettings, ModelConfig, TrainConfig
    from cotune.models.loader import load_base_model
    from cotune.models.lora import AdapterPool, lora_config
    from cotune.training.loop import make_optimizer, make_scheduler, train_step

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    lora = LoraSettings(r=4, alpha=32, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    train = TrainConfig(lr=2e-3, batch_size=args.batch)
    total_steps = 2 + args.steps * args.reps

    # cotune: the runtime's pool, optimizer, schedule and step
    base, tok = load_base_model(ModelConfig(name=args.model), cpu, torch.float32)
    pool = AdapterPool(base, lora, ["client-00"])
    c_opt = make_optimizer(pool.parameters("client-00"), train)
    c_sched = make_scheduler(c_opt, total_steps, train)

    # plain: the same weights loaded with transformers straight from the directory cotune cached
    model_dir = _cached_dir(args.model)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    plain.requires_grad_(False)
    plain = get_peft_model(plain, lora_config(lora))
    p_params = [p for p in plain.parameters() if p.requires_grad]
    p_opt = torch.optim.AdamW(p_params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)

    g = torch.Generator().manual_seed(0)
    vocab = len(tok)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g) for _ in range(8)]

    def cotune_block(n: int, offset: int) -> None:
        for s in range(n):
            ids = batches[(offset + s) % len(batches)]
            train_step(pool.model, [ids], c_opt, c_sched, train.max_grad_norm)

    def plain_block(n: int, offset: int) -> None:
        plain.train()
        for s in range(n):
            ids = batches[(offset + s) % len(batches)]
            loss = plain(input_ids=ids, labels=ids).loss
            loss.backward()
            loss.item()
            torch.nn.utils.clip_grad_norm_(p_params, train.max_grad_norm)
            p_opt.step()
            p_opt.zero_grad(set_to_none=True)

    sides = {"cotune": cotune_block, "plain": plain_block}
    for fn in sides.values():  # warm-up: allocator, autograd graph caches
        fn(2, 0)
    tokens = args.steps * args.batch * args.seq
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu_times: dict[str, list[float]] = {k: [] for k in sides}
    for rep in range(args.reps):
        order = ["cotune", "plain"] if rep % 2 == 0 else ["plain", "cotune"]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            sides[name](args.steps, rep * args.steps)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
        print(
            f"rep {rep}: cotune {tokens / times['cotune'][-1]:.0f} tok/s, "
            f"plain {tokens / times['plain'][-1]:.0f} tok/s",
            file=sys.stderr,
        )
    tps = {k: [tokens / t for t in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in tps.items()}
    ratio = med["cotune"] / med["plain"]
    per_rep = [c / p for c, p in zip(tps["cotune"], tps["plain"], strict=True)]
    cpu_tps = {k: [tokens / t for t in v] for k, v in cpu_times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_tps.items()}
    cpu_ratio = cpu_med["cotune"] / cpu_med["plain"]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU, fp32, torch threads={args.threads}"
    result = {
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "lora": lora.model_dump(),
        "steps_per_block": args.steps,
        "reps": args.reps,
        "machine": machine,
        "torch": torch.__version__,
        "tokens_per_s": tps,
        "median_tokens_per_s": med,
        "ratio_of_medians": ratio,
        "ratio_per_rep": per_rep,
        "median_ratio_per_rep": statistics.median(per_rep),
        "tokens_per_cpu_s": cpu_tps,
        "median_tokens_per_cpu_s": cpu_med,
        "cpu_ratio_of_medians": cpu_ratio,
        "load_1min_at_end": os.getloadavg()[0],
        "command": " ".join(["python", "bench/throughput.py", *sys.argv[1:]]),
    }
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "throughput.json").write_text(json.dumps(result, indent=2))
    md = [
        f"Training throughput, {args.model}, batch {args.batch} x {args.seq} tokens, LoRA r=4 on q/k/v/o, "
        f"{args.reps} alternating blocks of {args.steps} steps per side ({machine})",
        "",
        "| loop | median tokens/s (wall) | min | max | median tokens per CPU-second |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, v in tps.items():
        md.append(f"| {k} | {med[k]:.1f} | {min(v):.1f} | {max(v):.1f} | {cpu_med[k]:.1f} |")
    md += [
        "",
        f"ratio cotune / plain: **{ratio:.3f}** (medians of wall tokens/s); median of the per-repetition "
        f"ratios {statistics.median(per_rep):.3f}; by CPU time {cpu_ratio:.3f}",
    ]
    text = "\n".join(md) + "\n"
    (out_dir / "throughput.md").write_text(text)
    print(text)


def _cached_dir(name: str) -> Path:
    """The directory cotune cached the converted model in (config.json + safetensors)."""
    from cotune.config.schema import ModelConfig
    from cotune.models import loader

    for attr in ("cached_model_dir", "model_cache_dir"):
        fn = getattr(loader, attr, None)
        if callable(fn):
            try:
                return Path(fn(ModelConfig(name=name)))
            except Exception:  # fall back to scanning the cache
                pass
    root = Path(os.environ.get("COTUNE_CACHE", Path.home() / ".cache" / "cotune")) / "models"
    stem = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct"}.get(name, name)
    hits = sorted(p.parent for p in root.glob("*/config.json") if p.parent.name.startswith(stem))
    if not hits:
        raise FileNotFoundError(f"no cached model directory for {name} under {root}; run it once with cotune")
    return hits[0]


if __name__ == "__main__":
    main()
