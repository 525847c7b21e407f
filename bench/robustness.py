"""Robustness and privacy of the embedded personalized runtime (issue 6).

Four sections, each written to bench/results/robustness[-PRESET].json and .md:

* attacks: client 3 of 4 (one BBC topic each) attacks from round 1; the honest clients' final
  validation perplexity per strategy (fedavg with mean / median / trimmed mean, and the trust
  strategies), with the trust the honest clients gave the attacker in the last aggregation;
* faults: injected faults (raise, over the time limit, NaN update, update over the norm bound, too
  few clients left, SIGKILL of a real `cotune run` + `--resume`) and the rounds each run completed;
* bad inputs: each bad input of the issue through the CLI, the exit code and the error it gave;
* privacy: client-level DP (clip + Gaussian noise) for fedavg, honest perplexity and epsilon.

    .venv/bin/python bench/robustness.py                    # tiny random model: every section, ~3 min
    .venv/bin/python bench/robustness.py --preset smollm2   # SmolLM2-135M: the attack matrix only

Faults, bad inputs and privacy always use the tiny model (they test mechanisms, not quality).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ATTACKER = 3

PRESETS: dict[str, dict] = {
    "tiny": {
        "model": {
            "name": "tiny",
            "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128},
        },
        "lora": {
            "r": 4,
            "alpha": 32,
            "dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
        "data": {"seq_len": 64, "max_train_windows": 64, "max_val_windows": 8, "public_windows": 8},
        "train": {"lr": 3e-3, "batch_size": 8, "eval_batch_size": 8},
        "federation": {"clients": 4, "rounds": 4, "local_steps": 5, "warmup_steps": 10},
        "strategy": {"val_batches": 1, "public_batches": 1},
    },
    "smollm2": {
        "model": {"name": "smollm2-135m-instruct"},
        "lora": {"r": 4, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"seq_len": 32, "max_train_windows": 32, "max_val_windows": 4, "public_windows": 4},
        "train": {"lr": 2e-3, "batch_size": 2, "eval_batch_size": 4},
        "federation": {"clients": 4, "rounds": 2, "local_steps": 2, "warmup_steps": 2},
        "strategy": {"val_batches": 1, "public_batches": 1},
    },
}

ATTACKS: dict[str, dict | None] = {
    "none": None,
    "noise": {"kind": "noise", "scale": 10.0},
    "sign_flip": {"kind": "sign_flip", "scale": 4.0},
    "garbage_data": {"kind": "garbage_data"},
}

SETUPS: dict[str, dict] = {
    "fedavg": {"strategy": {"name": "fedavg"}},
    "fedavg+median": {"strategy": {"name": "fedavg"}, "robustness": {"aggregator": "median"}},
    "fedavg+trimmed_mean": {
        "strategy": {"name": "fedavg"},
        "robustness": {"aggregator": "trimmed_mean", "trim_fraction": 0.25},
    },
    "weight": {"strategy": {"name": "weight"}},
    "validation": {"strategy": {"name": "validation"}},
    "prediction": {"strategy": {"name": "prediction"}},
}


def base_tree(preset: str, out: Path) -> dict:
    tree = json.loads(json.dumps(PRESETS[preset]))
    tree["data"].update(
        {
            "sources": [{"corpus": "bbc", "labels": ["business", "entertainment", "politics", "sports"]}],
            "partition": {"kind": "one_label"},
        }
    )
    tree.update({"algorithm": "personalized", "device": "cpu", "run": {"seed": 0, "out_dir": str(out)}})
    return tree


def merged(tree: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(tree))
    for key, value in extra.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def records(run_dir: Path) -> list[dict]:
    from cotune.reporting.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


class Runner:
    """Runs personalized configs in-process on one loaded base model and one dataset."""

    def __init__(self, tree: dict, out: Path) -> None:
        from rich.console import Console

        from cotune.config import config_from_dict
        from cotune.runtime.setup import load_model, load_windows

        self.out, self.console = out, Console(stderr=True, quiet=True)
        cfg = config_from_dict(tree)
        self.base, tokenizer, self.device = load_model(cfg, console=self.console)
        self.data = load_windows(cfg, tokenizer, self.console)

    def run(self, tree: dict, name: str) -> tuple[Path, str]:
        """Returns the run directory and how it ended (completed / the error)."""
        from cotune.config import config_from_dict
        from cotune.runtime.embedded import run_personalized_variant
        from cotune.runtime.rundir import init_run_dir

        cfg = config_from_dict(tree)
        cfg.run.name = name
        run_dir = self.out / name
        init_run_dir(run_dir, cfg)
        ended = "completed"
        try:
            self.base = run_personalized_variant(
                cfg, run_dir, self.base, self.data, self.device, self.console
            )
        except Exception as exc:
            ended = f"{type(exc).__name__}: {exc}"
        return run_dir, ended


def summarise(run_dir: Path, honest: list[int]) -> dict:
    recs = records(run_dir)
    split = "test" if any(r.get("split") == "test" for r in recs if r["type"] == "eval") else "val"
    evals = [r for r in recs if r["type"] == "eval" and r.get("split", "val") == split]
    last = max(r["round"] for r in evals)
    ppl = {r["client"]: r["ppl"] for r in evals if r["round"] == last}
    ppl0 = {r["client"]: r["ppl"] for r in evals if r["round"] == 0}
    trust = [r for r in recs if r["type"] == "trust"]
    w = trust[-1]["matrix"] if trust else None
    robust_agg = trust[-1].get("aggregator") if trust else None
    return {
        "honest_ppl": statistics.mean(ppl[c] for c in honest),
        "honest_ppl_max": max(ppl[c] for c in honest),
        "honest_ppl_round0": statistics.mean(ppl0[c] for c in honest),
        "attacker_ppl": ppl.get(ATTACKER),
        "trust_to_attacker": None
        if w is None or robust_agg
        else statistics.mean(w[i][ATTACKER] for i in honest),
        "rejected": sum(1 for r in recs if r.get("event") == "update_rejected"),
        "rounds_completed": max((r["round"] for r in recs if r["type"] == "round"), default=0),
    }


# ---- attacks ---------------------------------------------------------------------------------------


def attack_matrix(preset: str, out: Path, setups: list[str], attacks: list[str]) -> list[dict]:
    tree = base_tree(preset, out)
    runner = Runner(tree, out)
    honest = [c for c in range(tree["federation"]["clients"]) if c != ATTACKER]
    rows = []
    for attack in attacks:
        for setup in setups:
            extra = dict(SETUPS[setup])
            if ATTACKS[attack] is not None:
                extra["simulation"] = {"attack": {"clients": [ATTACKER], **ATTACKS[attack]}}
            t0 = time.perf_counter()
            run_dir, ended = runner.run(merged(tree, extra), f"{preset}-{attack}-{setup}")
            row = {"attack": attack, "setup": setup, "ended": ended, **summarise(run_dir, honest)}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    t0 = time.perf_counter()
    run_dir, ended = runner.run(merged(tree, {"strategy": {"name": "local"}}), f"{preset}-local")
    rows.append(
        {"attack": "any", "setup": "local (no collaboration)", "ended": ended, **summarise(run_dir, honest)}
    )
    rows[-1]["seconds"] = round(time.perf_counter() - t0, 1)
    return rows


# ---- faults ----------------------------------------------------------------------------------------


FAULTS: list[tuple[str, dict]] = [
    (
        "client 1 raises in round 2; min_clients 3",
        {
            "federation": {"min_clients": 3},
            "simulation": {"faults": [{"client": 1, "rounds": [2], "kind": "error"}]},
        },
    ),
    (
        "client 2 takes +120 s (injected) in rounds 1 and 3; client_timeout 60 s, min_clients 3",
        {
            "federation": {"min_clients": 3, "client_timeout": 60.0},
            "simulation": {"faults": [{"client": 2, "rounds": [1, 3], "kind": "delay", "seconds": 120}]},
        },
    ),
    ("client 3 uploads NaN every round", {"simulation": {"attack": {"clients": [3], "kind": "nan"}}}),
    (
        "client 3 uploads its update x1000; max_update_norm 5",
        {
            "robustness": {"max_update_norm": 5.0},
            "simulation": {"attack": {"clients": [3], "kind": "scale", "scale": 1000.0}},
        },
    ),
    (
        "clients 0 and 1 raise in round 3; min_clients 3",
        {
            "federation": {"min_clients": 3},
            "simulation": {"faults": [{"client": c, "rounds": [3], "kind": "error"} for c in (0, 1)]},
        },
    ),
]


def faults(out: Path) -> list[dict]:
    from cotune.runtime.checkpoint import latest_checkpoint

    tree = base_tree("tiny", out)
    runner = Runner(tree, out)
    rows = []
    for i, (what, extra) in enumerate(FAULTS):
        run_dir, ended = runner.run(merged(tree, extra), f"fault-{i}")
        recs = records(run_dir)
        rows.append(
            {
                "fault": what,
                "rounds_completed": max((r["round"] for r in recs if r["type"] == "round"), default=0),
                "rounds": tree["federation"]["rounds"],
                "dropped": [(r["round"], r["client"]) for r in recs if r.get("event") == "client_dropped"],
                "rejected": [(r["round"], r["client"]) for r in recs if r.get("event") == "update_rejected"],
                "ended": ended,
                "last_checkpoint": latest_checkpoint(run_dir)[0],
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    rows.append(sigkill(out, tree))
    return rows


def sigkill(out: Path, tree: dict) -> dict:
    """SIGKILL a real `cotune run` mid-round 3, `--resume`, compare with an uninterrupted run."""
    import torch
    import yaml
    from safetensors.torch import load_file

    from cotune.runtime.checkpoint import latest_checkpoint

    tree = merged(tree, {"strategy": {"name": "validation"}, "lora": {"dropout": 0.1}})
    cfg_path = out / "kill.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "cotune.cli.main", "run"]
    full, killed = out / "kill-full", out / "kill-killed"
    subprocess.run([*cli, str(cfg_path), "--out", str(full)], env=env, check=True, capture_output=True)
    proc = subprocess.Popen(
        [*cli, str(cfg_path), "--out", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    metrics = killed / "metrics.jsonl"
    while proc.poll() is None:
        text = metrics.read_text() if metrics.is_file() else ""
        if '"type":"train","round":3,"client":1' in text.replace(" ", ""):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    at_kill = latest_checkpoint(killed)[0]
    resumed = subprocess.run([*cli, "--resume", str(killed)], env=env, capture_output=True)

    def adapters(d: Path) -> dict:
        path = latest_checkpoint(d)[1]
        return {p.name: load_file(str(p / "adapter_model.safetensors")) for p in path.glob("client-*")}

    a, b = adapters(full), adapters(killed)
    same = a.keys() == b.keys() and all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])
    recs = records(killed)
    return {
        "fault": "SIGKILL of `cotune run` mid-round 3, then `cotune run --resume`",
        "rounds_completed": max(r["round"] for r in recs if r["type"] == "round"),
        "rounds": tree["federation"]["rounds"],
        "dropped": [],
        "rejected": [],
        "ended": f"killed (rc {proc.returncode}) with checkpoint round {at_kill}; resume rc "
        f"{resumed.returncode}; final adapters bit-identical to an uninterrupted run: {same}",
        "last_checkpoint": latest_checkpoint(killed)[0],
    }


# ---- bad inputs ------------------------------------------------------------------------------------


def run_cli(args: list[str]) -> tuple[int, str]:
    """The `cotune` console script in this process (its error boundary included): exit code, output."""
    import io

    from cotune.cli.main import cli

    buf, code = io.StringIO(), 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            cli(args)
        except SystemExit as e:
            code = int(e.code or 0)
    return code, buf.getvalue()


def bad_inputs(out: Path) -> list[dict]:
    import yaml

    from cotune.config.schema import TinyModelConfig
    from cotune.models.tiny import build_tiny_model, byte_tokenizer
    from cotune.runtime.lock import run_lock

    example = str(ROOT / "examples" / "tiny-personalized.yaml")
    fedcollm = yaml.safe_load((ROOT / "examples" / "fedcollm-tiny.yaml").read_text())
    bad = out / "bad.yaml"
    bad.write_text("model: {name: tiny\n  lora: [\n")
    small = out / "small"
    small.mkdir(exist_ok=True)
    (small / "a.txt").write_text("just a few words")
    tok = byte_tokenizer()
    tok.add_tokens(["<extra>"])
    other = out / "other-tokenizer-model"
    build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2), len(tok)).save_pretrained(
        other
    )
    tok.save_pretrained(other)
    mismatch = out / "mismatch.yaml"
    fedcollm["llm"]["model"] = {"name": str(other)}
    mismatch.write_text(yaml.safe_dump(fedcollm))
    resumable = out / "resume-other-config"
    run_cli(["run", example, "federation.rounds=1", "run.compare=[]", "--out", str(resumable)])
    cfg = resumable / "config.yaml"
    cfg.write_text(cfg.read_text().replace("lr: 0.002", "lr: 0.003"))
    unfinished = out / "unfinished"
    run_cli(["run", example, "federation.rounds=2", "run.compare=[]", "--out", str(unfinished)])
    shutil.rmtree(unfinished / "checkpoints" / "round-0002")
    binary, latin1, jsonl = out / "binary.txt", out / "latin1.txt", out / "notext.jsonl"
    binary.write_bytes(b"some words\x00\x01\x02 private")
    latin1.write_bytes("caf\xe9 au lait, private text".encode("latin-1"))
    jsonl.write_text('{"text": ["private"]}\n')
    a_file = out / "a-file.txt"
    a_file.write_text("mine")
    cases = [
        ("malformed YAML", ["run", str(bad)]),
        ("config file that does not exist", ["run", str(out / "none.yaml")]),
        ("unknown key", ["run", example, "no_such_key=3"]),
        ("mistyped key", ["run", example, "federation.round=3"]),
        ("mistyped value", ["run", example, "train.lr=fast"]),
        ("missing data path", ["run", example, "data.path=/nonexistent/corpus"]),
        ("missing model path", ["run", example, "model.name=/nonexistent/model.gguf"]),
        ("unknown model name", ["run", example, "model.name=no-such-model"]),
        ("corpus with too little text", ["run", example, f"data.path={small}"]),
        ("tokenizer mismatch (FedCoLLM)", ["run", str(mismatch)]),
        ("LoRA target the model lacks", ["run", example, "lora.target_modules=[q_proj,no_such_proj]"]),
        ("attacker index out of range", ["run", example, "simulation.attack.clients=[7]"]),
        ("--resume with another config's checkpoint", ["run", "--resume", str(resumable)]),
        ("AdamW betas out of range", ["run", example, "train.betas=[2,2]"]),
        ("infinite learning rate", ["run", example, "train.lr=.inf"]),
        ("run.name escaping the output folder", ["run", example, "run.name=../../escaped"]),
        (
            "top-k selection of more clients than exist",
            ["run", example, "strategy.selection=topk", "strategy.topk=9"],
        ),
        ("a public set that takes all the text", ["run", example, "data.seq_len=100000"]),
        ("binary file as training text", ["run", example, f"data.path={binary}"]),
        ("text that is not UTF-8", ["run", example, f"data.path={latin1}"]),
        ("JSONL 'text' that is not a string", ["run", example, f"data.path={jsonl}"]),
        ("--out that is a file", ["run", example, "--out", str(a_file)]),
        (
            "--resume with an override that changes the experiment",
            ["run", "--resume", str(unfinished), "train.lr=0.5"],
        ),
        ("--resume with --out", ["run", "--resume", str(unfinished), "--out", str(out / "elsewhere")]),
        ("a run directory in use by another process", ["run", "--resume", str(unfinished)]),
    ]
    rows = []
    os.environ["COLUMNS"] = "1000"
    for what, args in cases:
        target = out / "bad-run"
        extra = [] if "--resume" in args or "--out" in args else ["--out", str(target)]
        with run_lock(unfinished) if "in use" in what else contextlib.nullcontext():
            code, output = run_cli([*args, *extra])
        text = " ".join(output.replace(f"{ROOT}/", "").split())
        error = text[text.find("error:") :] if "error:" in text else text[-300:]
        rows.append(
            {
                "input": what,
                "command": "cotune "
                + " ".join(a.replace(str(out), "$TMP").replace(f"{ROOT}/", "") for a in args),
                "exit_code": code,
                "error": error.replace(str(out), "$TMP")[:400],
                "run_dir_left": target.exists(),
            }
        )
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(Path(str(target) + ".local"), ignore_errors=True)
    return rows


# ---- inflated example counts (FedCoLLM's FedAvg weights) ------------------------------------------


def claims(out: Path) -> list[dict]:
    """fedcollm-tiny with FedAvg, honest and with client 1 claiming 10^9 examples (its n_k)."""
    from safetensors.torch import load_file

    from cotune.runtime.checkpoint import latest_checkpoint

    example = str(ROOT / "examples" / "fedcollm-tiny.yaml")
    liar = ["simulation.attack.clients=[1]", "simulation.attack.kind=inflated_claim"]
    rows, server = [], []
    for what, extra in [("honest clients", []), ("client 1 claims 10^9 examples", liar)]:
        run_dir = out / f"claims-{len(rows)}"
        code, _ = run_cli(
            ["run", example, "algorithm=fedavg", "run.compare=[]", *extra, "--out", str(run_dir)]
        )
        recs = records(run_dir)
        last = max(r["round"] for r in recs if r["type"] == "mc")
        server.append(load_file(str(latest_checkpoint(run_dir)[1] / "server" / "adapter_model.safetensors")))
        rows.append(
            {
                "case": what,
                "exit_code": code,
                "claims_rejected": [r["reason"] for r in recs if r.get("event") == "claim_rejected"],
                "final_slm_acc": next(
                    r["acc"] for r in recs if r["type"] == "mc" and r["model"] == "slm" and r["round"] == last
                ),
            }
        )
    rows[-1]["server_adapter_identical_to_honest"] = all(
        bool((server[0][k] == server[1][k]).all()) for k in server[0]
    )
    return rows


# ---- privacy ---------------------------------------------------------------------------------------


def privacy(out: Path) -> list[dict]:
    tree = base_tree("tiny", out)
    runner = Runner(tree, out)
    honest = list(range(tree["federation"]["clients"]))
    clips = {}
    for strategy in ("fedavg", "ffa_lora"):  # C: the median update norm of a clip-free probe run
        probe_tree = merged(tree, {"privacy": {"clip_norm": 1e9}, "strategy": {"name": strategy}})
        probe, _ = runner.run(probe_tree, f"dp-probe-{strategy}")
        norms = [x for r in records(probe) if r.get("event") == "clip" for x in r["update_norms"]]
        clips[strategy] = round(statistics.median(norms), 4)
    rows = []
    grid = [("fedavg", sigma, None) for sigma in (None, 0.0, 0.5, 1.0, 2.0)] + [("fedavg", 1.0, 2)]
    grid += [("ffa_lora", sigma, None) for sigma in (None, 0.5, 1.0, 2.0)]  # DP on the shared B only
    for strategy, sigma, per_round in grid:
        clip = clips[strategy]
        extra: dict = {"strategy": {"name": strategy}}
        if sigma is not None:
            extra["privacy"] = {"clip_norm": clip, "noise_multiplier": sigma, "seed": 0}
        if per_round is not None:
            extra["federation"] = {"clients_per_round": per_round}
        run_dir, ended = runner.run(merged(tree, extra), f"dp-{strategy}-{sigma}-{per_round}")
        spent = [r for r in records(run_dir) if r.get("event") == "spent"]
        rows.append(
            {
                "strategy": strategy,
                "clip_norm": None if sigma is None else clip,
                "noise_multiplier": sigma,
                "sample_rate": spent[-1]["sample_rate"] if spent else None,
                "epsilon": spent[-1]["epsilon"] if spent else None,
                "delta": spent[-1]["delta"] if spent else None,
                "rounds": tree["federation"]["rounds"],
                "ppl": summarise(run_dir, honest)["honest_ppl"],
                "ended": ended,
            }
        )
    return rows


# ---- report ----------------------------------------------------------------------------------------


def fmt(x, digits=2) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Robustness and privacy (preset {result['preset']})",
        "",
        f"Machine: {m['cpu']} ({m['cores']} cores, torch threads {m['threads']}), {m['platform']}, "
        f"torch {m['torch']}. Command: `{result['command']}`. Wall time: {result['wall_s'] / 60:.1f} min.",
        "",
    ]
    if result.get("attacks"):
        p = PRESETS[result["preset"]]
        fed = p["federation"]
        lines += [
            "## Attacks",
            "",
            f"Model `{p['model']['name']}`; 4 clients, one BBC topic each (business, entertainment, "
            "politics, "
            f"sports); client {ATTACKER} (sports) attacks from round 1; {fed['warmup_steps']} warm-up steps, "
            f"{fed['rounds']} rounds of {fed['local_steps']} local steps. Attacks: `noise` (random update, "
            "10x the honest RMS), `sign_flip` (−4 x its update), `garbage_data` (trains on random tokens). "
            "Honest ppl: mean final validation perplexity of the 3 honest clients (round 0: "
            f"{fmt(result['attacks'][0]['honest_ppl_round0'])}); trust to attacker: mean weight the honest "
            "clients' rows give the attacker in the last aggregation (fedavg: 0.25).",
            "",
        ]
        attacks = list(dict.fromkeys(r["attack"] for r in result["attacks"] if r["attack"] != "any"))
        lines.append(
            "| strategy | " + " | ".join(f"honest ppl, {a}" for a in attacks) + " | trust to attacker |"
        )
        lines.append("|---|" + "---:|" * (len(attacks) + 1))
        by = {(r["setup"], r["attack"]): r for r in result["attacks"]}
        for setup in dict.fromkeys(r["setup"] for r in result["attacks"]):
            if setup.startswith("local"):
                r = by[(setup, "any")]
                lines.append(f"| {setup} | " + " | ".join(fmt(r["honest_ppl"]) for _ in attacks) + " | – |")
                continue
            cells = [fmt(by[(setup, a)]["honest_ppl"]) if (setup, a) in by else "" for a in attacks]
            trust = [
                f"{a}: {fmt(by[(setup, a)]['trust_to_attacker'], 3)}"
                for a in attacks
                if a != "none" and (setup, a) in by and by[(setup, a)]["trust_to_attacker"] is not None
            ]
            lines.append(f"| {setup} | " + " | ".join(cells) + f" | {', '.join(trust) or '–'} |")
        lines.append("")
    if result.get("faults"):
        lines += [
            "## Faults",
            "",
            "| fault injected | rounds completed | dropped (round, client) | "
            "rejected (round, client) | outcome |",
            "|---|---:|---|---|---|",
        ]
        for r in result["faults"]:
            lines.append(
                f"| {r['fault']} | {r['rounds_completed']}/{r['rounds']} | {r['dropped'] or '–'} | "
                f"{r['rejected'] or '–'} | {r['ended']} (last checkpoint: round {r['last_checkpoint']}) |"
            )
        lines.append("")
    if result.get("bad_inputs"):
        lines += ["## Bad inputs", "", "| input | exit | run dir left | error given |", "|---|---:|---|---|"]
        for r in result["bad_inputs"]:
            err = r["error"].replace("|", "\\|")
            lines.append(
                f"| {r['input']} | {r['exit_code']} | {'yes' if r['run_dir_left'] else 'no'} | {err} |"
            )
        lines.append("")
    if result.get("claims"):
        lines += [
            "## Inflated example counts (FedCoLLM FedAvg, fedcollm-tiny)",
            "",
            "| case | exit | claims rejected | final SLM acc | server adapter as honest |",
            "|---|---:|---|---:|---|",
        ]
        for r in result["claims"]:
            same = r.get("server_adapter_identical_to_honest")
            lines.append(
                f"| {r['case']} | {r['exit_code']} | {'; '.join(r['claims_rejected']) or '–'} | "
                f"{r['final_slm_acc']:.3f} | {'–' if same is None else ('yes' if same else 'no')} |"
            )
        lines.append("")
    if result.get("privacy"):
        lines += [
            "## Client-level differential privacy (fedavg and FFA-LoRA, tiny model)",
            "",
            "C is the median update norm of a clip-free probe run of the same strategy (FFA-LoRA's update is "
            "its B only: A never moves); epsilon from Opacus' RDP accountant with q the sampling rate (1: "
            "every client every round; 0.5: `federation.clients_per_round: 2`). Perplexity on each client's "
            "test split.",
            "",
            "| strategy | clip C | noise multiplier | q | epsilon | delta | mean ppl (all 4 clients) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["privacy"]:
            eps = "∞ (no noise)" if r["noise_multiplier"] == 0.0 else fmt(r["epsilon"])
            lines.append(
                f"| {r.get('strategy', 'fedavg')} | {fmt(r['clip_norm'], 4)} | "
                f"{fmt(r['noise_multiplier'], 1)} | "
                f"{fmt(r.get('sample_rate'))} | "
                f"{eps if r['clip_norm'] else '– (no DP)'} | {fmt(r['delta'], 6) if r['delta'] else '–'} | "
                f"{fmt(r['ppl'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=list(ATTACKS))
    ap.add_argument(
        "--sections",
        nargs="*",
        default=None,
        choices=["attacks", "faults", "bad_inputs", "claims", "privacy"],
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    sections = args.sections or (
        ["attacks"] if args.preset != "tiny" else ["attacks", "faults", "bad_inputs", "claims", "privacy"]
    )
    t0 = time.perf_counter()
    result: dict = {
        "preset": args.preset,
        "command": "python bench/robustness.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
    }
    with tempfile.TemporaryDirectory(prefix="cotune-robustness-") as tmp:
        out = Path(tmp)
        for section in sections:
            where = out / section
            where.mkdir()
            if section == "attacks":
                result["attacks"] = attack_matrix(args.preset, where, args.setups, args.attacks)
            elif section == "faults":
                result["faults"] = faults(where)
            elif section == "bad_inputs":
                result["bad_inputs"] = bad_inputs(where)
            elif section == "claims":
                result["claims"] = claims(where)
            else:
                result["privacy"] = privacy(where)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "robustness" if args.preset == "tiny" else f"robustness-{args.preset}"
    path = RESULTS / f"{stem}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    ran = {s: {"command": result["command"], "wall_s": result["wall_s"]} for s in sections}
    result["sections_measured_by"] = {**previous.get("sections_measured_by", {}), **ran}
    result = {**previous, **result}  # sections not run this time keep their last measurement
    path.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (RESULTS / f"{stem}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
