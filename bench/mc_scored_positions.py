"""Multiple-choice scoring with one-token choices: the vocabulary projection run on the scored positions
only (what `score_requests` does for transformers models) against the logits of every position, side by
side in one process, on the same examples.

BBC 5-way topic task as the FedCoLLM benchmarks build it (`task.max_chars` 400, `task.max_length` 256, the
fedcollm-*-bbc configs), a fresh LoRA adapter on the model, one torch thread, batch 8 (their
`train.eval_batch_size`). The two ways alternate `--repeats` times; prints the median wall time of each,
their ratio and whether every choice's log-likelihood is the same bit for bit. This is the scoring the
server's validation split runs at every scored distillation step (bench/README, "cheaper selection").

    PYTHONPATH=src python bench/mc_scored_positions.py [--model qwen2.5-coder-0.5b-instruct] [--examples 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mc_shared_context import model_with_fresh_adapter  # the model as the MC scoring benches load it

from cotune.config.schema import SourceConfig
from cotune.data.tasks import build_task
from cotune.evaluation import multiple_choice as mc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model, tok = model_with_fresh_adapter(args.model)
    examples = build_task(SourceConfig(corpus="bbc", max_docs=20), max_chars=400)[: args.examples]
    transformers_model = mc.keeps_kv_cache
    runs: dict[str, list[float]] = {"scored positions": [], "every position": []}
    results: dict[str, mc.MCResult] = {}
    for _ in range(args.repeats):
        for way in runs:  # alternating, so neither way always runs on a warmer machine
            mc.keeps_kv_cache = transformers_model if way == "scored positions" else (lambda m: False)
            t0 = time.perf_counter()
            results[way] = mc.evaluate_multiple_choice(model, tok, examples, batch_size=8, max_length=256)
            runs[way].append(time.perf_counter() - t0)
    mc.keeps_kv_cache = transformers_model
    scored, every = (statistics.median(runs[w]) for w in runs)
    same = results["scored positions"].logliks == results["every position"].logliks
    print(
        f"{args.model}, {len(examples)} examples ({mc.choice_count(examples)} choices), median of "
        f"{args.repeats}: scored positions {scored:.1f} s, every position {every:.1f} s: "
        f"{scored / every:.2f}x the time; log-likelihoods bit-identical: {same}"
    )


if __name__ == "__main__":
    main()
