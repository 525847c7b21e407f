"""Measure what distill.topk saves: one mutual-distillation batch (SLM step + LLM step) per setting.

Each setting runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own. Prints a Markdown
table and writes bench/results/kd_memory.json.

    .venv/bin/python bench/kd_memory.py [--model smollm2-135m-instruct] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def one(model: str, batch: int, seq: int, topk: int | None) -> dict:
    import torch

    from cotune.config.schema import DistillConfig, LoraSettings, ModelConfig
    from cotune.models.loader import load_base_model
    from cotune.models.lora import AdapterPool
    from cotune.training.distill import student_step, teacher_signal
    from cotune.training.loop import make_optimizer, make_scheduler

    cpu = torch.device("cpu")
    slm_base, tok = load_base_model(ModelConfig(name=model), cpu, torch.float32)
    llm_base, _ = load_base_model(ModelConfig(name=model), cpu, torch.float32)
    lora = LoraSettings(r=8, alpha=16, dropout=0.0)
    slm, llm = AdapterPool(slm_base, lora, ["s"]), AdapterPool(llm_base, lora, ["l"])
    from cotune.config.schema import TrainConfig

    train = TrainConfig()
    opts = {n: make_optimizer(p.parameters(n), train) for n, p in (("s", slm), ("l", llm))}
    scheds = {n: make_scheduler(o, 10, train) for n, o in opts.items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # answer-only supervision on the second half
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    cfg = DistillConfig(topk=topk)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    t_llm = teacher_signal(llm.model, b, len(tok), topk)
    student_step(slm.model, t_llm, b, opts["s"], scheds["s"], cfg, len(tok), 1.0)
    t_slm = teacher_signal(slm.model, b, len(tok), topk)
    student_step(llm.model, t_slm, b, opts["l"], scheds["l"], cfg, len(tok), 1.0)
    return {
        "topk": topk,
        "teacher_bytes": max(t_llm.nbytes, t_slm.nbytes),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_step_mb": rss0 / 1024,
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(
            json.dumps(one(args.model, args.batch, args.seq, None if args.one == "none" else int(args.one)))
        )
        return
    rows = []
    for k in ("none", "128"):
        cmd = [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
        ]
        out = subprocess.run([*cmd, "--one", k], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    machine = f"{platform.machine()}, {__import__('os').cpu_count()} cores, CPU, fp32"
    print(
        f"KD memory, {args.model} as both LLM and SLM, batch {args.batch} x {args.seq} tokens ({machine})\n"
    )
    print("| distill.topk | teacher signal held | peak RSS | RSS before the step | step time |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['topk']} | {r['teacher_bytes'] / 1e6:.2f} MB | {r['peak_rss_mb']:.0f} MB "
            f"| {r['rss_before_step_mb']:.0f} MB | {r['seconds']:.1f} s |"
        )
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    result = {
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "machine": machine,
        "rows": rows,
        "command": " ".join(["python", "bench/kd_memory.py", *sys.argv[1:]]),
    }
    (out_dir / "kd_memory.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
