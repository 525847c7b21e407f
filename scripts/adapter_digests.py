"""Fingerprints of the final adapters of a fixed set of runs: a refactoring must leave them bit-identical.

Each case is `cotune run CONFIG OVERRIDES` (CPU, one thread); the digest of an adapter is the sha256 of
its tensors (sorted keys, dtype, shape and raw bytes) in the run's last checkpoint. Covers every
example config, every personalized strategy, every FedCoLLM-family algorithm, robustness, privacy,
attacks, dropped clients and LoRA dropout on the tiny models, and one SmolLM2 run.

    python scripts/adapter_digests.py --write scripts/adapter_digests.json   # record (before a change)
    python scripts/adapter_digests.py --check scripts/adapter_digests.json   # compare (after it)
    python scripts/adapter_digests.py --check scripts/adapter_digests.json --tiny   # skip SmolLM2

`--check` exits 1 and names every adapter whose weights changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["device=cpu", "run.threads=1"]
TINY_P = "examples/tiny-personalized.yaml"
TINY_F = "examples/fedcollm-tiny.yaml"

CASES: dict[str, tuple[str, list[str]]] = {
    "personalized-strategies": (
        TINY_P,
        ["strategy.name=validation", "run.compare=[local,fedavg,weight,prediction,oracle]"],
    ),
    "personalized-median": (
        TINY_P,
        ["strategy.name=fedavg", "robustness.aggregator=median", "run.compare=[]"],
    ),
    "personalized-dp-weight": (
        TINY_P,
        [
            "strategy.name=weight",
            "privacy.clip_norm=1.0",
            "privacy.noise_multiplier=0.5",
            "privacy.seed=1",
            "run.compare=[fedavg]",
        ],
    ),
    "personalized-attack-screened": (
        TINY_P,
        [
            "strategy.name=fedavg",
            "simulation.attack.clients=[1]",
            "simulation.attack.kind=noise",
            "robustness.max_update_norm=1.0",
            "run.compare=[]",
        ],
    ),
    "personalized-dropout-topk": (
        TINY_P,
        [
            "lora.dropout=0.1",
            "strategy.name=prediction",
            "strategy.selection=topk",
            "strategy.topk=2",
            "run.compare=[]",
        ],
    ),
    "personalized-fault": (
        TINY_P,
        [
            "strategy.name=weight",
            "simulation.faults=[{client: 2, rounds: [1]}]",
            "federation.min_clients=3",
            "run.compare=[]",
        ],
    ),
    "fedcollm-algorithms": (TINY_F, ["run.compare=[fedavg,standalone,centralized,zero_shot]"]),
    "fedcollm-variants": (
        TINY_F,
        [
            "distill.topk=8",
            "distill.order=epoch",
            "federation.local_epochs=1",
            "federation.weighting=uniform",
            "lora.dropout=0.1",
            "llm.lora.dropout=0.1",
        ],
    ),
    "fedcollm-dp": (
        TINY_F,
        ["privacy.clip_norm=0.5", "privacy.noise_multiplier=0.3", "privacy.seed=2", "run.compare=[fedavg]"],
    ),
    "fedcollm-trimmed-fault": (
        TINY_F,
        [
            "algorithm=fedavg",
            "robustness.aggregator=trimmed_mean",
            "robustness.trim_fraction=0.25",
            "simulation.faults=[{client: 1, rounds: [2]}]",
            "federation.min_clients=3",
        ],
    ),
    "smollm2-quickstart": (
        "examples/quickstart.yaml",
        [
            "federation.rounds=1",
            "federation.local_steps=2",
            "federation.warmup_steps=1",
            "data.max_train_windows=16",
            "run.compare=[]",
        ],
    ),
}


def tensor_digest(path: Path) -> str:
    h = hashlib.sha256()
    for key, t in sorted(load_file(str(path)).items()):
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_dirs_of(out: Path) -> list[Path]:
    return sorted(d for d in out.parent.iterdir() if d.name == out.name or d.name.startswith(out.name + "."))


def final_adapters(run_dir: Path) -> dict[str, str]:
    rounds = sorted((run_dir / "checkpoints").glob("round-*"))
    last = rounds[-1]
    return {f.parent.name: tensor_digest(f) for f in sorted(last.glob("*/adapter_model.safetensors"))}


def run_case(name: str, config: str, overrides: list[str], work: Path) -> dict[str, dict[str, str]]:
    out = work / name
    cmd = [str(Path(sys.executable).parent / "cotune"), "run", config, *COMMON, *overrides, "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: `{' '.join(cmd)}` failed:\n{done.stderr[-3000:]}")
    return {d.name: final_adapters(d) for d in run_dirs_of(out)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path)
    mode.add_argument("--check", type=Path)
    parser.add_argument("--tiny", action="store_true", help="skip the SmolLM2 case")
    parser.add_argument("--only", nargs="*", default=None, help="run only these cases")
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        help="dotted overrides added to every case (e.g. data.test_fraction=0 to check a personalized change "
        "against digests recorded before test splits)",
    )
    args = parser.parse_args()
    cases = {k: v for k, v in CASES.items() if not (args.tiny and k.startswith("smollm2"))}
    if args.only:
        cases = {k: v for k, v in cases.items() if k in args.only}
    got: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="cotune-digests-") as tmp:
        for name, (config, overrides) in cases.items():
            got.update(run_case(name, config, [*overrides, *args.override], Path(tmp)))
            print(f"{name}: done", flush=True)
    if args.write:  # adds to (or updates) what the file already records
        recorded = json.loads(args.write.read_text()) if args.write.exists() else {}
        args.write.write_text(json.dumps({**recorded, **got}, indent=1, sort_keys=True) + "\n")
        print(f"{sum(len(v) for v in got.values())} adapters of {len(got)} runs -> {args.write}")
        return 0
    want = json.loads(args.check.read_text())
    changed = [
        f"{run}/{adapter}"
        for run, adapters in got.items()
        for adapter, digest in adapters.items()
        if want.get(run, {}).get(adapter) != digest
    ]
    missing = [run for run in got if run not in want]
    n = sum(len(v) for v in got.values())
    if changed or missing:
        print(f"CHANGED ({len(changed)} of {n} adapters): {', '.join(changed)}; not recorded: {missing}")
        return 1
    print(f"bit-identical: {n} adapters of {len(got)} runs match {args.check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
