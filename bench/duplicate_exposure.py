"""How much of a committed FedCoLLM result rests on test examples that were also trained on (issue 31,
item 5), without rerunning it.

Corpora can hold the same document twice (BBC: copied articles). Since tasks drop exact duplicates before
any split (cotune.data.duplicates), new runs cannot have a test example in training. Runs made before
could: this script rebuilds, for each seed of a results file, the splits those runs used — with the code
of the commit that ran the seed (a temporary `git worktree`; the splits depend on that code's random
streams) — and counts, per split, the examples whose prompt (whitespace-normalised) occurs in another
split, and the test examples whose prompt was in the public set or a client's data. The runs logged only
accuracies, not which test examples they got right, so the accuracy without the exposed examples is
given as its exact range: with n test examples of which k exposed, an accuracy a becomes at least
(a·n − k)/(n − k) (every exposed example was right) and at most a·n/(n − k) (every one was wrong); a
paired difference moves by at most k/(n − k) beyond its rescaling. Counts only: no text is printed.

    .venv/bin/python bench/duplicate_exposure.py bench/results/fedcollm_quality_qwen-bbc.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Run in a child process on the source tree of the commit that ran a seed: rebuilds that seed's splits
# with that code and prints the exposure counts (this file's `exposure`, imported by path).
CHILD = """
import importlib.util, json, sys
from cotune.config.schema import TaskConfig
from cotune.data.task_data import build_task_data
from cotune.models.tiny import byte_tokenizer

spec = importlib.util.spec_from_file_location("duplicate_exposure", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
args = json.loads(sys.argv[2])
cfg = TaskConfig.model_validate(args["task"])
data = build_task_data(cfg, args["clients"], byte_tokenizer(), args["seed"], args["val_fraction"])
s = data.splits
print(json.dumps(module.exposure(s.public, s.clients, s.test, data.test)))
"""


def prompt_key(example: Any) -> str:
    """Two examples are the same when their prompts are, whitespace aside (what the model reads)."""
    return " ".join(example.prompt.split())


def exposure(
    public: Sequence[Any], clients: Sequence[Sequence[Any]], test_split: Sequence[Any], test: Sequence[Any]
) -> dict[str, Any]:
    """Per split (public, each client, the whole test split), the examples whose prompt occurs more than
    once across all splits; of the scored test examples (`test`: the test split after
    task.max_test_examples), those whose prompt is in the public set or a client's data, and those that
    repeat another scored test example."""
    splits = {"public": public, **{f"client {i}": part for i, part in enumerate(clients)}, "test": test_split}
    counts = Counter(prompt_key(ex) for part in splits.values() for ex in part)
    trained = {prompt_key(ex) for part in (public, *clients) for ex in part}
    scored = [prompt_key(ex) for ex in test]
    return {
        "examples": {name: len(part) for name, part in splits.items()},
        "duplicated": {name: sum(counts[prompt_key(ex)] > 1 for ex in part) for name, part in splits.items()},
        "scored_test": len(test),
        "scored_test_in_training": sum(k in trained for k in scored),
        "scored_test_repeated": len(scored) - len(set(scored)),
    }


def accuracy_range(acc: float, n: int, k: int) -> tuple[float, float]:
    """The accuracy over the n − k unexposed test examples, given the accuracy over all n: its exact range
    (every exposed example right, every one wrong)."""
    if k == 0:
        return acc, acc
    if k >= n:
        raise ValueError("every test example is exposed: nothing is left to score")
    correct = acc * n
    return max(0.0, (correct - k) / (n - k)), min(1.0, correct / (n - k))


def difference_range(a: float, b: float, n: int, k: int) -> tuple[float, float]:
    """a − b over the unexposed examples (both scored on the same n, k of them exposed): its range."""
    a_lo, a_hi = accuracy_range(a, n, k)
    b_lo, b_hi = accuracy_range(b, n, k)
    return a_lo - b_hi, a_hi - b_lo


def with_commit(commit: str, work: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """The exposure counts computed by the code of `commit` (a temporary detached worktree)."""
    tree = work / commit
    if not tree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], cwd=ROOT, check=True)
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(Path(__file__).resolve()), json.dumps(payload)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tree,
    )
    if done.returncode != 0:
        raise SystemExit(f"error: rebuilding the splits at {commit} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ranges_for_seed(accuracy: dict[str, float | None], n: int, k: int) -> dict[str, Any]:
    figures = {name: list(accuracy_range(a, n, k)) for name, a in accuracy.items() if a is not None}
    pairs = {}
    for a, b in (("slm_fedcollm", "slm_fedavg"), ("llm_fedcollm", "llm_centralized")):
        if accuracy.get(a) is not None and accuracy.get(b) is not None:
            pairs[f"{a} − {b}"] = {
                "reported": accuracy[a] - accuracy[b],  # type: ignore[operator]
                "range": list(difference_range(accuracy[a], accuracy[b], n, k)),  # type: ignore[arg-type]
            }
    return {"figures": figures, "pairs": pairs}


def markdown(name: str, seeds: dict[str, Any]) -> str:
    lines = [
        f"Test examples also trained on, `{name}` (splits rebuilt with each seed's own commit; counts only)",
        "",
        "| seed | commit | scored test | in public / client data | repeated in test | duplicated per split "
        "(public, clients, whole test split) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for seed, body in seeds.items():
        e = body["exposure"]
        per_split = ", ".join(f"{k} {v}/{e['examples'][k]}" for k, v in e["duplicated"].items())
        lines.append(
            f"| {seed} | {body['commit']} | {e['scored_test']} | {e['scored_test_in_training']} "
            f"| {e['scored_test_repeated']} | {per_split} |"
        )
    lines += [
        "",
        "Accuracy (%) as reported, and its exact range over the test examples that were not trained on:",
        "",
        "| seed | figure | reported | without the exposed examples |",
        "|---|---|---:|---|",
    ]
    for seed, body in seeds.items():
        for fig, (lo, hi) in body["ranges"]["figures"].items():
            lines.append(
                f"| {seed} | {fig} | {100 * body['accuracy'][fig]:.2f} | {100 * lo:.2f} to {100 * hi:.2f} |"
            )
        for pair, p in body["ranges"]["pairs"].items():
            lo, hi = p["range"]
            lines.append(
                f"| {seed} | {pair} | {100 * p['reported']:+.2f} | {100 * lo:+.2f} to {100 * hi:+.2f} |"
            )
    return "\n".join(lines) + "\n"


def digest(values: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(values).encode()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path, help="a fedcollm_quality results JSON (multiple choice)")
    args = ap.parse_args()
    result = json.loads(args.results.read_text())
    budget = result["budget"]
    seeds: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cotune-exposure-") as tmp:
        try:
            for seed, body in result["per_seed"].items():
                commit = result["commits_by_seed"][seed][0]
                payload = {
                    "task": budget["task"],
                    "clients": budget["clients"],
                    "seed": int(seed),
                    "val_fraction": budget["distill"]["val_fraction"],
                }
                e = with_commit(commit, Path(tmp), payload)
                n, k = e["scored_test"], e["scored_test_in_training"]
                seeds[seed] = {
                    "commit": commit,
                    "exposure": e,
                    "accuracy": body["accuracy"],
                    "ranges": ranges_for_seed(body["accuracy"], n, k),
                }
                print(f"[seed {seed}] {commit}: {k} of {n} scored test examples were in training", flush=True)
        finally:
            subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=False)
    name = args.results.stem
    out = {"results": str(args.results), "results_sha256": digest([args.results.read_text()]), "seeds": seeds}
    (HERE / "results" / f"duplicate_exposure_{name}.json").write_text(json.dumps(out, indent=2))
    text = markdown(name, seeds)
    (HERE / "results" / f"duplicate_exposure_{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
